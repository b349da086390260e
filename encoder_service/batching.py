"""Packing pieces (tiles, frames, dynamic-resolution images) into ragged forward passes under a
ViT-token budget.

A batch is a list of spans, each a run of consecutive pieces of one item. Items are
served oldest first; an item that does not fit what is left of the budget is split,
and its remaining pieces are first in line for the next batch. Pieces are independent
sequences, so splitting an item never changes its embeddings, and order is kept, so
each item's rows come out in piece order.

Both the in-process engine (`EncoderEngine.run`) and the serving pipeline pack with
this one queue.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable, Generic, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Span(Generic[T]):
    """Pieces [start, stop) of `item`."""

    item: T
    start: int
    stop: int

    @property
    def num_tiles(self) -> int:
        return self.stop - self.start


@dataclass
class _Entry(Generic[T]):
    item: T
    next_piece: int
    ends: list[int]  # running total of the pieces' tokens

    def tokens(self, start: int, stop: int) -> int:
        return self.ends[stop - 1] - (self.ends[start - 1] if start else 0) if stop > start else 0


class TileQueue(Generic[T]):
    """FIFO of items with pieces still to encode. Not thread-safe: the caller holds its lock."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._entries: deque[_Entry[T]] = deque()

    def push(self, item: T, piece_tokens: Sequence[int]) -> None:
        """Queue `item`, whose pieces are sequences of `piece_tokens[i]` ViT tokens."""
        if piece_tokens and max(piece_tokens) > self.max_tokens:
            raise ValueError(f"a piece of {max(piece_tokens)} tokens exceeds the batch budget of {self.max_tokens}")
        if piece_tokens:
            self._entries.append(_Entry(item, 0, list(accumulate(piece_tokens))))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def queued_tokens(self) -> int:
        return sum(e.tokens(e.next_piece, len(e.ends)) for e in self._entries)

    def take(self) -> list[Span[T]]:
        """The next batch: whole or partial items, oldest first, within `max_tokens`."""
        spans: list[Span[T]] = []
        budget = self.max_tokens
        while self._entries:
            entry = self._entries[0]
            start = stop = entry.next_piece
            while stop < len(entry.ends) and entry.tokens(start, stop + 1) <= budget:
                stop += 1
            if stop == start:
                break
            spans.append(Span(entry.item, start, stop))
            entry.next_piece = stop
            budget -= entry.tokens(start, stop)
            if stop < len(entry.ends):
                break  # the rest of this item leads the next batch
            self._entries.popleft()
        return spans

    def drop(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove the items for which `predicate` holds (e.g. their request was cancelled)."""
        dropped = [e.item for e in self._entries if predicate(e.item)]
        if dropped:
            self._entries = deque(e for e in self._entries if not predicate(e.item))
        return dropped
