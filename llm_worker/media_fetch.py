"""Fetching media rows from the pool into the LLM worker's embedding cache, for a batch of requests.

- `fetch_embeddings`: ONE Encode call for every item not already cached (identical items deduplicated),
  the single returned tensor split by the returned counts, the cache filled and the entries pinned.
- `StreamedFetch`: the same split in two, for rows that arrive while prefill runs: the pool streams each
  item as soon as it is encoded (EncodeStream), and a prompt's chunks are prefilled up to the first item
  still missing. It pins what is cached at once and starts ONE streamed Encode for the rest on a
  background thread; the encoder's thread only queues arrivals, and the engine's thread moves them into
  the cache (`drain`), so the cache stays single-threaded. An item is `ready` once its rows are resident
  and pinned for every request that needs it.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Protocol

import torch

from encoder_service.client.checks import Encoder, check_answer_count
from encoder_service.contract.media import MediaInput
from encoder_service.contract.result import EncodeResult, ItemEmbedding
from llm_worker.mm_cache import EmbeddingCache
from llm_worker.prompt import MediaSpan


@dataclass
class MediaRef:
    """One media item of one request: its cache key and where its rows go."""

    key: str
    span: MediaSpan
    media: MediaInput
    pruned: bool = False  # an EVS-pruned video: its per-frame counts arrive with its rows


def pin_cached(requests: list[list[MediaRef]], cache: EmbeddingCache) -> tuple[dict[str, MediaInput], dict[str, int],
                                                                                list[str]]:
    """Pin, once per request, every distinct item of these requests the cache holds (so this batch's
    inserts cannot evict it); returns (missing: key -> media, in order; pins each missing key needs: one
    per request; the keys pinned now)."""
    missing: dict[str, MediaInput] = {}
    pins_needed: dict[str, int] = {}
    pinned: list[str] = []
    for refs in requests:
        for key in dict.fromkeys(r.key for r in refs):  # distinct keys, in order
            if key in missing:
                pins_needed[key] += 1
            elif cache.lookup(key) is not None:
                cache.pin(key)
                pinned.append(key)
            else:
                missing[key] = next(r.media for r in refs if r.key == key)
                pins_needed[key] = 1
    return missing, pins_needed, pinned


def fetch_embeddings(requests: list[list[MediaRef]], encoder: Encoder, cache: EmbeddingCache) -> int:
    """Make every item of these requests resident and pinned once per request; returns Encode calls made.

    The caller unpins each request's distinct keys when that request's prefill is over.
    """
    missing, pins_needed, pinned = pin_cached(requests, cache)
    if not missing:
        return 0
    try:
        result = encoder.encode(list(missing.values()))
        check_answer_count(len(missing), result)
    except BaseException:
        for key in pinned:  # leave the cache as it was: no pins for requests that will not run
            cache.unpin(key)
        raise
    for key, rows, meta in zip(missing, result.split(), result.items):
        # A copy per item: the cache's byte accounting must not keep the whole batch tensor alive.
        cache.put(key, rows.clone(), meta.tokens_per_frame, pins=pins_needed[key])
    return 1

_DONE = object()


class StreamingEncoder(Encoder, Protocol):
    def encode_stream(self, items: list[MediaInput], on_item) -> EncodeResult: ...


class StreamedFetch:
    """The uncached items of a batch of requests, being encoded in the background."""

    def __init__(self, requests: list[list[MediaRef]], encoder: StreamingEncoder, cache: EmbeddingCache):
        self.cache = cache
        # pending: key -> media, until its rows are in the cache; pins: pending key -> requests that will
        # hold a pin on it (the cached keys are pinned now; each request unpins them through `abandon`).
        self.pending, self.pins, _ = pin_cached(requests, cache)
        self.calls = 1 if self.pending else 0
        self._keys = list(self.pending)
        self._arrivals: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.finished = not self.pending
        if self.pending:
            threading.Thread(target=self._run, args=(encoder, list(self.pending.values())),
                             name="streamed-fetch", daemon=True).start()

    def _run(self, encoder: StreamingEncoder, items: list[MediaInput]) -> None:
        try:
            check_answer_count(len(items), encoder.encode_stream(items, self._arrived))
            self._arrivals.put((_DONE, None))
        except BaseException as e:  # noqa: BLE001 - handed to the engine's thread
            self._arrivals.put((_DONE, e))

    def _arrived(self, index: int, item: ItemEmbedding, rows: torch.Tensor, model: str) -> None:
        # A copy of its own: the cache must not keep the whole streamed tensor alive.
        self._arrivals.put((self._keys[index], (rows.clone(), list(item.tokens_per_frame))))

    def ready(self, key: str) -> bool:
        return key not in self.pending

    def drain(self, wait_s: float = 0.0) -> bool:
        """Move arrived rows into the cache (waiting up to `wait_s` for the first); True if any arrived or
        the fetch ended. Raises the encoder's error once the stream failed."""
        moved = False
        while True:
            try:
                key, payload = self._arrivals.get(timeout=wait_s) if wait_s and not moved else self._arrivals.get_nowait()
            except queue.Empty:
                return moved
            moved = True
            if key is _DONE:
                self.finished, self.error = True, payload
                if payload is not None:
                    raise payload
                if self.pending:
                    self.error = ValueError(f"the stream ended without {len(self.pending)} item(s)")
                    raise self.error
                continue
            if key in self.pending:
                rows, tokens_per_frame = payload
                del self.pending[key]
                self.cache.put(key, rows, tokens_per_frame, pins=self.pins.pop(key))

    def abandon(self, keys: list[str]) -> list[str]:
        """A request gives up its share of these keys: its pins on pending ones are dropped (they arrive
        with one pin fewer); returns the keys it holds a pin on now (the caller unpins them)."""
        held = []
        for key in keys:
            if key in self.pending:
                self.pins[key] -= 1
            else:
                held.append(key)
        return held
