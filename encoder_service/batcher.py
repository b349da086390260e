"""Pack tiles into ragged forward passes bounded by a ViT-token budget.

Tiles are independent sequences, so an item's tiles may land in different
batches; order is preserved, which keeps the concatenated output in item order.
"""

from __future__ import annotations


def plan_batches(tile_tokens: list[int], max_tokens: int) -> list[range]:
    """Greedy consecutive packing: each range of tile indices fits in `max_tokens` ViT tokens."""
    batches, start, used = [], 0, 0
    for i, n in enumerate(tile_tokens):
        if n > max_tokens:
            raise ValueError(f"a tile of {n} tokens exceeds the batch budget of {max_tokens}")
        if used + n > max_tokens:
            batches.append(range(start, i))
            start, used = i, 0
        used += n
    if start < len(tile_tokens):
        batches.append(range(start, len(tile_tokens)))
    return batches
