"""Packing tiles into ragged forward passes under a ViT-token budget.

A batch is a list of spans, each a run of consecutive tiles of one item. Items are
served oldest first; an item that does not fit what is left of the budget is split,
and its remaining tiles are first in line for the next batch. Tiles are independent
sequences, so splitting an item never changes its embeddings, and order is kept, so
each item's rows come out in tile order.

Both the in-process engine (`EncoderEngine.run`) and the serving pipeline pack with
this one queue.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Span(Generic[T]):
    """Tiles [start, stop) of `item`."""

    item: T
    start: int
    stop: int

    @property
    def num_tiles(self) -> int:
        return self.stop - self.start


@dataclass
class _Entry(Generic[T]):
    item: T
    next_tile: int
    num_tiles: int
    tokens_per_tile: int


class TileQueue(Generic[T]):
    """FIFO of items with tiles still to encode. Not thread-safe: the caller holds its lock."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._entries: deque[_Entry[T]] = deque()

    def push(self, item: T, num_tiles: int, tokens_per_tile: int) -> None:
        if tokens_per_tile > self.max_tokens:
            raise ValueError(f"a tile of {tokens_per_tile} tokens exceeds the batch budget of {self.max_tokens}")
        if num_tiles > 0:
            self._entries.append(_Entry(item, 0, num_tiles, tokens_per_tile))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def queued_tokens(self) -> int:
        return sum((e.num_tiles - e.next_tile) * e.tokens_per_tile for e in self._entries)

    def take(self) -> list[Span[T]]:
        """The next batch: whole or partial items, oldest first, within `max_tokens`."""
        spans: list[Span[T]] = []
        budget = self.max_tokens
        while self._entries:
            entry = self._entries[0]
            fit = min(entry.num_tiles - entry.next_tile, budget // entry.tokens_per_tile)
            if fit == 0:
                break
            spans.append(Span(entry.item, entry.next_tile, entry.next_tile + fit))
            entry.next_tile += fit
            budget -= fit * entry.tokens_per_tile
            if entry.next_tile < entry.num_tiles:
                break  # the rest of this item leads the next batch
            self._entries.popleft()
        return spans

    def drop(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove the items for which `predicate` holds (e.g. their request was cancelled)."""
        dropped = [e.item for e in self._entries if predicate(e.item)]
        if dropped:
            self._entries = deque(e for e in self._entries if not predicate(e.item))
        return dropped
