"""Content affinity in the Ray Serve pool: a request for an item goes to the replica whose cache holds
that item's rows, unless that replica is busier than its share.

The routing key is the request's `session_id` (gRPC metadata "session_id" through Serve's proxy,
`handle.options(session_id=...)` on the handle path): clients set it to the item's media digest
(`PoolEncoderClient` does, sending one item per request; see `encoder_service.client.pool`). Keys map to
replicas by consistent hashing, so adding or losing a replica moves only the keys it owned.

Why not Ray's `ConsistentHashRouter`: it leaves an item's owner only when the owner refuses at
`max_ongoing_requests` (32 here), so a popular image queues dozens deep on one replica while the
others idle. This router bounds the load instead ("consistent hashing with bounded loads",
Mirrokni, Thorup and Zadimoghaddam): a replica takes a key only while its requests in flight are
under `load_factor` x the pool's mean (+1), and never refuses below `min_load` (a replica batches
several requests at once: a few in flight is not overload, and queue lengths seen by a router lag);
otherwise the key goes to the next replica on the ring, which then caches the item too (a hot item
ends up on as many replicas as its load needs). Requests without a key go to the less loaded of
two replicas picked at random, as with Serve's default router.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from typing import List, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

ROUTER_CLASS = "encoder_service.serving.api.serve.routing:ContentAffinityRouter"


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    """Replicas on a ring of `virtual_nodes` points each; a key's owners are the distinct replicas
    met clockwise from the key's point."""

    def __init__(self, members: list[str], virtual_nodes: int = 64):
        points = sorted((_point(f"{member}#{i}"), member) for member in members for i in range(virtual_nodes))
        self._points = [p for p, _ in points]
        self._members = [m for _, m in points]
        self.size = len(set(members))

    def owners(self, key: str) -> list[str]:
        """Every member, in the order the key prefers them."""
        if not self._points:
            return []
        start = bisect.bisect(self._points, _point(key))
        seen: dict[str, None] = {}
        for i in range(len(self._points)):
            seen.setdefault(self._members[(start + i) % len(self._points)])
            if len(seen) == self.size:
                break
        return list(seen)


def bounded_choice(owners: list[str], loads: dict[str, int], load_factor: float, min_load: int = 4) -> list[str]:
    """The owners in the order to try: the first one under the load bound leads, the rest follow in
    ring order (they are the fallbacks when it refuses)."""
    bound = max(min_load, math.ceil(load_factor * (sum(loads.values()) + 1) / max(1, len(owners))))
    first = next((o for o in owners if loads.get(o, 0) < bound), owners[0])
    return [first] + [o for o in owners if o != first]


class ContentAffinityRouter(RequestRouter):
    def initialize_state(self, virtual_nodes: int = 64, load_factor: float = 1.25, min_load: int = 4, **kwargs) -> None:
        if virtual_nodes <= 0 or load_factor < 1 or min_load < 1:
            raise ValueError("virtual_nodes and min_load must be positive and load_factor at least 1")
        self._virtual_nodes, self._load_factor, self._min_load = virtual_nodes, load_factor, min_load
        self._ring = HashRing([], virtual_nodes)
        self._ring_members: frozenset[str] = frozenset()
        self._by_unique_id: dict[str, ReplicaID] = {}

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        members = frozenset(r.replica_id.unique_id for r in replicas)
        if members != self._ring_members:  # the ring changes only when the replica set does
            self._by_unique_id = {r.replica_id.unique_id: r.replica_id for r in replicas}
            self._ring = HashRing(sorted(members), self._virtual_nodes)
            self._ring_members = members

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # every rank full: back off, don't spin
        key = pending_request.metadata.session_id if pending_request is not None else ""
        if not key or not candidate_replicas:  # the less loaded of two at random (the base class compares them)
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        owners = [o for o in self._ring.owners(key) if o in by_id]
        if not owners:
            return [candidate_replicas]
        cache = self.replica_queue_len_cache
        loads = {o: cache.get(by_id[o].replica_id) or 0 for o in owners}
        return [[by_id[o]] for o in bounded_choice(owners, loads, self._load_factor, self._min_load)]
