"""Cache of encoder outputs keyed by media content hash, with a byte budget.

Entries used by a request still in prefill are pinned: they are never evicted,
because that request's later chunks slice them (an evicted entry would force a
re-encode mid-prompt). Unpinned entries go in LRU order when over budget.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch

from encoder_service.contract.media import MediaInput, Modality, item_key, media_digest


def item_cache_key(item: MediaInput, pruning_rate: float = 0.0) -> str:
    """Stable key of what an item encodes to (`digest.item_key`: the media digest, computed here from the
    bytes, the video sampling and the EVS rate actually applied): the same key the pool's cache uses,
    without the pool's model and tenant parts. A client-supplied hash is never trusted."""
    sampling = None if item.sampling is None else dataclasses.astuple(item.sampling)
    q = pruning_rate if item.modality == Modality.VIDEO else 0.0
    return item_key("", "", item.modality.value, media_digest(item.data), sampling, q)


@dataclass
class CacheEntry:
    embeddings: torch.Tensor
    tokens_per_frame: list[int]
    pins: int = 0

    @property
    def nbytes(self) -> int:
        return self.embeddings.numel() * self.embeddings.element_size()


@dataclass
class EmbeddingCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_used: int = 0
    entries: int = 0


class EmbeddingCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self.stats = EmbeddingCacheStats()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str) -> CacheEntry | None:
        """Counted lookup (hit/miss); a hit becomes most recently used."""
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self._entries.move_to_end(key)
        return entry

    def get(self, key: str) -> CacheEntry:
        """Uncounted access to an entry the caller holds a pin on."""
        return self._entries[key]

    def put(
        self, key: str, embeddings: torch.Tensor, tokens_per_frame: list[int] | None = None, pins: int = 0
    ) -> CacheEntry:
        """Insert (or refresh) an entry; `pins` are taken before any eviction can see it."""
        if key in self._entries:
            entry = self._entries[key]
        else:
            entry = CacheEntry(embeddings, list(tokens_per_frame or []))
            self._entries[key] = entry
            self.stats.bytes_used += entry.nbytes
        entry.pins += pins
        self._entries.move_to_end(key)
        self._evict()
        self.stats.entries = len(self._entries)
        return entry

    def pin(self, key: str) -> None:
        self._entries[key].pins += 1

    def unpin(self, key: str) -> None:
        entry = self._entries[key]
        if entry.pins <= 0:
            raise RuntimeError(f"unpin of an unpinned cache entry {key}")
        entry.pins -= 1
        self._evict()

    def pinned_keys(self) -> set[str]:
        return {k for k, e in self._entries.items() if e.pins}

    def _evict(self) -> None:
        """Drop least recently used unpinned entries until within budget (pinned ones may overshoot it)."""
        if self.stats.bytes_used <= self.max_bytes:
            return
        for key in [k for k, e in self._entries.items() if not e.pins]:
            if self.stats.bytes_used <= self.max_bytes:
                break
            entry = self._entries.pop(key)
            self.stats.bytes_used -= entry.nbytes
            self.stats.evictions += 1
        self.stats.entries = len(self._entries)
