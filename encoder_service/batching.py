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
from typing import Any, Callable, Generic, Sequence, TypeVar

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


@dataclass(frozen=True)
class PieceSource:
    """Where one item's pieces come from and where its rows go, for `batch_inputs`."""

    pixels: Any  # flat uint8 tensor: the item's pieces [h, w, 3] back to back (host or device)
    sizes: Sequence[tuple[int, int]]  # each piece's (h, w)
    rows: Sequence[int]  # embedding rows of each piece
    target: Any  # [sum(rows), hidden]: where the item's rows are written


def byte_range(sizes: Sequence[tuple[int, int]], start: int, stop: int) -> tuple[int, int]:
    """Where pieces [start, stop) lie in an item's flat pixel buffer."""
    begin = sum(h * w * 3 for h, w in sizes[:start])
    return begin, begin + sum(h * w * 3 for h, w in sizes[start:stop])


def batch_inputs(spans: Sequence[Span[T]], source: Callable[[T], PieceSource | None]) -> tuple[list, list, list]:
    """A batch's (pixels, sizes, outputs) for `EncoderEngine.launch`: each span's pieces and the slice of its
    item's rows they fill. `source(item)`: None skips the span (an item that failed meanwhile)."""
    pixels, sizes, outputs = [], [], []
    for span in spans:
        src = source(span.item)
        if src is None:
            continue
        begin, end = byte_range(src.sizes, span.start, span.stop)
        pixels.append(src.pixels[begin:end])
        sizes.append(list(src.sizes[span.start : span.stop]))
        first = sum(src.rows[: span.start])
        outputs.append(src.target[first : first + sum(src.rows[span.start : span.stop])])
    return pixels, sizes, outputs
