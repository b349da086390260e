"""Media rows in the prompt: where they go, and into which prefill chunk (fetching them: `media_fetch`).

1. `media_region`: an item's prompt region from its plan (sizes and counts only), before encoding.
2. `relayout_frames`: a pruned video's region, laid out before encoding with its final length,
   gets the per-frame counts the encoder reported (kept with the cached rows, so every later
   request and chunk rebuilds the same layout) before any chunk touching it is prefilled.
3. `merge_chunk`: for a chunk covering prompt positions [start, end), write
   exactly the embedding rows whose placeholders fall inside it; an item that
   straddles chunks is sliced, never re-encoded.
"""

from __future__ import annotations

import torch

from encoder_service.client.checks import EmbeddingCountMismatch
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.contract.plan import ItemPlan
from llm_worker.prompt import MediaRegion, MediaSpan, PromptLayout, nemotron_frame_time


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
