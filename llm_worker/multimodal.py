"""Getting media embeddings into prefill chunks.

1. `fetch_embeddings`: for a batch of requests, ONE Encode call for every item
   not already cached (identical items deduplicated), the single returned tensor
   split by the returned counts, the cache filled and the entries pinned.
2. `relayout_frames`: a pruned video's region, laid out before encoding with its final length,
   gets the per-frame counts the encoder reported (kept with the cached rows, so every later
   request and chunk rebuilds the same layout) before any chunk touching it is prefilled.
3. `merge_chunk`: for a chunk covering prompt positions [start, end), write
   exactly the embedding rows whose placeholders fall inside it; an item that
   straddles chunks is sliced, never re-encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from encoder_service.engine import ModelInfo
from encoder_service.fingerprint import ModelFingerprint
from encoder_service.processor import ItemPlan, MediaInput, Modality
from encoder_service.serving.wire import EncodeResult
from llm_worker.mm_cache import EmbeddingCache
from llm_worker.prompt import MediaRegion, MediaSpan, PromptLayout, nemotron_frame_time


class Encoder(Protocol):
    """What the worker needs of the encoder pool (EncoderClient, or the Ray actor's pool client)."""

    def encode(self, items: list[MediaInput]) -> EncodeResult: ...

    def model_info(self) -> ModelInfo: ...


class EmbeddingCountMismatch(ValueError):
    """The encoder returned a different number of rows than the prompt has placeholders."""


class WrongEncoder(ValueError):
    """The pool serves another model than the one this LLM's embeddings must come from."""


class CheckedEncoder:
    """The pool, every answer checked against the model this LLM expects (`fingerprint.ModelFingerprint`):
    at connect (GetModelInfo) and on each response (`extras["model"]`, whichever replica answered), so a
    replica changed under the worker is refused, never merged."""

    def __init__(self, encoder: Encoder, expected: ModelFingerprint):
        self.encoder, self.expected = encoder, expected
        served = encoder.model_info().fingerprint
        problems = ["the pool reports no model fingerprint"] if served is None else served.mismatches(expected)
        if problems:
            raise WrongEncoder(f"the encoder pool serves another model than this LLM expects: {'; '.join(problems)}")

    def model_info(self) -> ModelInfo:
        return self.encoder.model_info()

    def encode(self, items: list[MediaInput]) -> EncodeResult:
        result = self.encoder.encode(items)
        self._check({answer.get("model") for answer in [result.extras, *result.extras.get("parts", [])]})
        return result

    def encode_stream(self, items: list[MediaInput], on_item) -> EncodeResult:
        """Each streamed item is checked before it is passed on (its rows are used before the stream ends)."""
        def checked(index, item, rows, model: str) -> None:
            self._check({model})
            on_item(index, item, rows, model)

        return self.encoder.encode_stream(items, checked)

    def _check(self, models: set) -> None:
        """The contract digests an answer carries must all be the expected model's."""
        if models != {self.expected.contract}:
            raise WrongEncoder("a replica of the encoder pool answered for another model than this LLM expects")


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


def check_answer_count(sent: int, result: EncodeResult) -> None:
    if len(result.items) != sent:
        raise EmbeddingCountMismatch(f"sent {sent} items, encoder answered {len(result.items)}")


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


def media_region(item: MediaInput, plan: ItemPlan) -> MediaRegion:
    """An item's prompt region before encoding, from its plan (sizes and counts only).

    A pruned video's frames keep counts only EVS knows: its K rows are laid out as [K, 0, ..., 0],
    which has the final region's length; `relayout_frames` puts the real counts in."""
    if item.modality != Modality.VIDEO:
        return MediaRegion([plan.tokens])
    counts = [plan.tokens] + [0] * (plan.num_tiles - 1) if plan.pruned else list(plan.tokens_per_frame)
    times = [nemotron_frame_time(i, plan.frames.fps) for i in plan.frames.indices] if plan.frames else None
    return MediaRegion(counts, times, video=True)


def relayout_frames(layout: PromptLayout, index: int, tokens_per_frame: list[int], pruned: bool) -> PromptLayout:
    """The layout with video `index` laid out as the encoder's per-frame counts say.

    A pruned video's region is rebuilt with them (same total length, nothing else moves); any
    other item's runs must already match them (equal totals are not enough: frames differ)."""
    span = layout.spans[index]
    counts = list(tokens_per_frame)
    if not counts or counts == span.frame_counts:
        return layout
    if pruned:
        try:
            return layout.with_frame_counts(index, counts)
        except ValueError as e:
            raise EmbeddingCountMismatch(f"video at prompt position {span.offset}: {e}") from None
    raise EmbeddingCountMismatch(
        f"video at prompt position {span.offset}: placeholders per frame {span.frame_counts} "
        f"but the encoder returned {counts}"
    )


def merge_chunk(
    chunk_embeds: torch.Tensor, start: int, items: list[tuple[MediaSpan, torch.Tensor]]
) -> int:
    """Write media rows into `chunk_embeds` (prompt positions [start, start + len)); returns rows written."""
    end = start + chunk_embeds.shape[0]
    written = 0
    for span, rows in items:
        if rows.shape[0] != span.length:
            raise EmbeddingCountMismatch(
                f"media item at prompt position {span.offset} has {span.length} placeholders "
                f"but the encoder returned {rows.shape[0]} embedding rows"
            )
        if rows.shape[1] != chunk_embeds.shape[1]:
            raise EmbeddingCountMismatch(
                f"embedding width {rows.shape[1]} does not match the LLM hidden size {chunk_embeds.shape[1]}"
            )
        row_base = 0
        for run in span.runs:
            lo, hi = max(run.offset, start), min(run.offset + run.length, end)
            if lo < hi:
                first = row_base + lo - run.offset
                chunk_embeds[lo - start : hi - start] = rows[first : first + hi - lo].to(chunk_embeds.dtype)
                written += hi - lo
            row_base += run.length
    return written
