"""Where embedding rows live: every item's rows in one region of shared memory, read in place by the
responses that carry them, and kept after their last reader as the pool's embedding cache.

Two arenas, both shared with the transport process (which frames responses from them):
- the cache arena (its size is the cache's byte budget): regions of cacheable items. Once the item is
  encoded its region is *published*: findable by key, read by every request for the same item, and,
  when no response reads it any more, evictable in least-recently-used order. A hit is a reference,
  not a copy;
- the outputs arena: regions of items that are not cached (cache off, or an item larger than the
  whole cache), freed with their last reader. Allocation there waits for room: it bounds the bytes of
  responses in flight.
A region counts its readers: the job writing it holds one, each response holding it one more.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from encoder_service.contract.media import SampledFrames
from encoder_service.contract.result import ItemEmbedding, describe_item
from encoder_service.serving.host.arena import SharedArena

OUTPUTS, CACHE = 0, 1  # arena ids, as segments name them to the transport


@dataclass(eq=False)
class Region:
    """One item's rows: `nbytes` at `offset` of arena `arena`, and what a response says about them."""

    arena: int
    offset: int
    nbytes: int
    key: str | None  # cache key (None: never published)
    readers: int = 1
    resident: bool = False  # published: findable by key, evictable once unread
    # Filled when the rows are complete:
    rows: int = 0
    num_tiles: int = 0
    tokens_per_frame: list[int] = field(default_factory=list)
    frames: SampledFrames | None = None  # a video container's sampled frames
    digest: str = ""

    def describe(self, offset: int, cache_hit: bool, item_id: str = "", content_hash: str = "") -> ItemEmbedding:
        """What an answer says of these rows, placed at `offset` of its tensor."""
        return describe_item(offset, self.rows, self.num_tiles, self.tokens_per_frame, self.frames, self.digest,
                             cache_hit, item_id, content_hash, self.resident)


@dataclass
class RowCacheStats:
    hits: int = 0  # items answered from a resident region
    joins: int = 0  # items answered by an identical item being encoded at the time (single-flight)
    inserts: int = 0
    evictions: int = 0
    bytes: int = 0  # resident
    entries: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class RowStore:
    def __init__(self, outputs: SharedArena, cache: SharedArena | None = None):
        self.arenas = {OUTPUTS: outputs, CACHE: cache}
        self.cache = cache
        self._lock = threading.Lock()
        self._index: OrderedDict[str, Region] = OrderedDict()  # resident regions, least recently used first
        self.stats = RowCacheStats()

    # ------------------------------------------------------------------ lookups

    def find(self, key: str) -> Region | None:
        """A resident region for `key`, with a reader taken for the caller (who must `release` it)."""
        with self._lock:
            region = self._index.get(key)
            if region is not None:
                region.readers += 1
                self._index.move_to_end(key)
                self.stats.hits += 1
            return region

    # ------------------------------------------------------------------ writing rows

    def allocate(self, nbytes: int, key: str | None, keep_waiting: Callable[[], bool]) -> Region | None:
        """A region for rows being encoded, held by the caller (one reader). Cacheable rows go to the
        cache arena, evicting unread entries as needed; others (or when every cached region is being
        read) to the outputs arena, waiting for room while `keep_waiting()`. None: gave up waiting."""
        if key is not None and self.cache is not None and self.cache.fits(nbytes):
            with self._lock:
                offset = self.cache.alloc(nbytes, keep_waiting=lambda: False)
                while offset is None and self._evict_one():
                    offset = self.cache.alloc(nbytes, keep_waiting=lambda: False)
            if offset is not None:
                return Region(CACHE, offset, nbytes, key)
        offset = self.arenas[OUTPUTS].alloc(nbytes, keep_waiting=keep_waiting)
        return None if offset is None else Region(OUTPUTS, offset, nbytes, None)

    def publish(self, region: Region) -> None:
        """Complete rows of a cacheable item become findable (the writer keeps its reader until it releases)."""
        if region.arena != CACHE or region.key is None:
            return
        with self._lock:
            if region.key in self._index:  # an identical item finished first: keep one copy
                return
            region.resident = True
            self._index[region.key] = region
            self.stats.inserts += 1
            self.stats.bytes += region.nbytes
            self.stats.entries = len(self._index)

    # ------------------------------------------------------------------ readers

    def acquire(self, region: Region) -> None:
        with self._lock:
            region.readers += 1

    def release(self, region: Region) -> None:
        """Drop one reader; an unpublished region goes back to its arena with its last reader."""
        with self._lock:
            region.readers -= 1
            if region.readers < 0:
                raise RuntimeError("a region was released more often than it was acquired")
            if region.readers or region.resident:
                return
        self.arenas[region.arena].free(region.offset)

    def _evict_one(self) -> bool:
        """Drop the least recently used unread entry (caller holds the lock). False: none can go."""
        for key, region in self._index.items():
            if not region.readers:
                del self._index[key]
                region.resident = False
                self.cache.free(region.offset)
                self.stats.evictions += 1
                self.stats.bytes -= region.nbytes
                self.stats.entries = len(self._index)
                return True
        return False
