"""Unit level: packing pieces (tiles, frames, dynamic-resolution images) under the token budget, and the
shared-memory arena's allocator."""

import random
import threading

import pytest

from encoder_service.batching import TileQueue
from encoder_service.serving.host.arena import ALIGNMENT, SharedArena


def test_items_split_across_batches_keep_order_and_budget():
    queue = TileQueue(max_tokens=10)
    queue.push("a", [3] * 3)  # 9 tokens
    queue.push("b", [2] * 5)  # 10 tokens
    queue.push("c", [10])
    batches = []
    while spans := queue.take():
        batches.append([(s.item, s.start, s.stop) for s in spans])
    assert batches == [[("a", 0, 3)], [("b", 0, 5)], [("c", 0, 1)]]

    queue.push("x", [3] * 7)  # 21 tokens: split 3 + 3 + 1 tiles
    queue.push("y", [1] * 2)
    batches = []
    while spans := queue.take():
        batches.append([(s.item, s.start, s.stop) for s in spans])
    assert batches == [[("x", 0, 3)], [("x", 3, 6)], [("x", 6, 7), ("y", 0, 2)]]

    # Pieces of different lengths (dynamic-resolution images next to tiles): packed in order.
    queue.push("d", [6, 3, 5])
    queue.push("e", [2])
    batches = []
    while spans := queue.take():
        batches.append([(s.item, s.start, s.stop) for s in spans])
    assert batches == [[("d", 0, 2)], [("d", 2, 3), ("e", 0, 1)]]


@pytest.mark.parametrize("seed", range(5))
def test_random_packing_covers_every_tile_once_in_order(seed):
    rng = random.Random(seed)
    budget = rng.randint(10, 60)
    queue = TileQueue(max_tokens=budget)
    items = {i: [rng.randint(1, budget) for _ in range(rng.randint(1, 9))] for i in range(rng.randint(1, 30))}
    for i, pieces in items.items():
        queue.push(i, pieces)
    seen = {i: 0 for i in items}
    while spans := queue.take():
        assert sum(sum(items[s.item][s.start : s.stop]) for s in spans) <= budget
        for s in spans:
            assert s.start == seen[s.item]  # pieces of an item in order, none skipped
            seen[s.item] = s.stop
    assert queue.queued_tokens == 0
    assert seen == {i: len(pieces) for i, pieces in items.items()}


def test_drop_removes_items_and_oversized_tiles_are_refused():
    queue = TileQueue(max_tokens=8)
    for name in "abc":
        queue.push(name, [4, 4])
    assert queue.drop(lambda item: item == "b") == ["b"]
    assert [s.item for s in queue.take()] == ["a"]
    assert [s.item for s in queue.take()] == ["c"]
    with pytest.raises(ValueError, match="exceeds the batch budget"):
        queue.push("huge", [1, 9])


def test_arena_first_fit_coalesces_and_waits_for_space():
    arena = SharedArena(8 * ALIGNMENT)
    a = arena.alloc(3 * ALIGNMENT)
    b = arena.alloc(1)  # rounded up to one page
    c = arena.alloc(4 * ALIGNMENT)
    assert (a, b, c) == (0, 3 * ALIGNMENT, 4 * ALIGNMENT)
    assert arena.alloc(1, keep_waiting=lambda: False) is None  # full; the caller gave up
    arena.free(a)
    arena.free(b)  # coalesces with a: 4 free pages at the start
    assert arena.alloc(4 * ALIGNMENT) == 0

    got = []
    waiter = threading.Thread(target=lambda: got.append(arena.alloc(2 * ALIGNMENT)))
    waiter.start()
    arena.free(c)  # wakes the waiter
    waiter.join(timeout=5)
    assert got == [4 * ALIGNMENT]
    arena.free(0)
    arena.free(got[0])
    assert arena.wait_idle(1) and arena.bytes_in_use == 0
    assert not arena.fits(9 * ALIGNMENT)
    with pytest.raises(ValueError):
        arena.alloc(9 * ALIGNMENT)
    arena.close()


def test_arena_random_alloc_free_never_overlaps():
    rng = random.Random(0)
    arena = SharedArena(64 * ALIGNMENT)
    live: dict[int, int] = {}
    for _ in range(500):
        if live and (rng.random() < 0.5 or len(live) > 20):
            offset = rng.choice(list(live))
            arena.free(offset)
            del live[offset]
        else:
            size = rng.randint(1, 6 * ALIGNMENT)
            offset = arena.alloc(size, keep_waiting=lambda: False)
            if offset is not None:
                for o, s in live.items():
                    assert offset + size <= o or o + s <= offset
                live[offset] = size
    for offset in live:
        arena.free(offset)
    assert arena.bytes_in_use == 0 and arena._free == [(0, arena.size)]
    arena.close()
