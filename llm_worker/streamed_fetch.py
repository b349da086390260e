"""Media rows that arrive while prefill runs: the pool streams each item as soon as it is encoded
(EncodeStream), and a prompt's chunks are prefilled up to the first item still missing.

`StreamedFetch` is `fetch_embeddings` split in two: it pins what is cached at once and starts ONE
streamed Encode for the rest on a background thread; the encoder's thread only queues arrivals,
and the engine's thread moves them into the cache (`drain`), so the cache stays single-threaded.
An item is `ready` once its rows are resident and pinned for every request that needs it.
"""

from __future__ import annotations

import queue
import threading
from typing import Protocol

import torch

from encoder_service.processor import MediaInput
from encoder_service.serving.wire import EncodeResult, ItemEmbedding
from llm_worker.mm_cache import EmbeddingCache
from llm_worker.multimodal import Encoder, MediaRef, check_answer_count, pin_cached

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
