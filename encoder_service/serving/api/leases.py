"""Rows handed out by reference (NIXL) and held for their reader: the endpoint's side of
`Rows.ROWS_BY_REFERENCE`.

The transport process registers the shared arenas (cache and outputs: where every answer's rows already
are) with one NIXL agent at start. An answer by reference is its header plus a `RowsReference`: the
segments of its rows in those arenas and a *lease*. While the lease lives the answer's regions keep a
reader (`rows.RowStore`: a region with readers is never evicted nor reused), exactly as while an inline
answer is being sent. A lease ends when its reader says so (a NIXL notification "release:<id>") or at its
expiry, whichever comes first; then the regions go back.

A lease also owns a slot of a small registered table that holds a random check word while the lease
lives and 0 after: the reader reads it after the rows, so a read that outlived its lease (rows possibly
reused) is detected, never used. The slot is cleared before the regions go back.

Bounds: bytes under lease per tenant (`NixlSettings.lease_mb_per_tenant`) and in all
(`lease_mb_total`), and slots; an answer beyond any goes inline instead (counted). Trust: any NIXL peer
holding this agent's metadata can read, and write, every registered byte (all tenants' cached rows); the
metadata is given only with a lease, to callers that passed the edge's authentication, and endpoints refuse
to hand out references without authentication at all (`require_token`). See the README.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from encoder_service.contract.reference import RowsReference, released_lease
from encoder_service.serving.host.model_process import SharedReply
from encoder_service.transfer.nixl import NixlSettings, new_agent

log = logging.getLogger(__name__)

SLOTS = 65536  # leases at once
# The agent has no progress thread (it would spin a core): UCX progresses here, when notifications are read.
# Readers' transfers need that progress (UCX emulates READ with messages on some transports), so it is read
# often while leases are being handed out and given back, rarely when idle.
POLL_BUSY_S, POLL_IDLE_S, BUSY_FOR_S = 0.00025, 0.005, 0.5


@dataclass
class Lease:
    id: str
    reply: SharedReply
    tenant: str
    nbytes: int
    expires: float  # time.monotonic()
    slot: int


@dataclass
class LeaseStats:
    granted: int = 0
    released: int = 0  # by their readers
    expired: int = 0
    refused: int = 0  # answered inline instead (over a bound)
    active: int = 0
    bytes: int = 0  # under lease now


def require_token(authenticated: bool) -> None:
    """Rows by reference only where callers must authenticate: the references go to callers only, and a NIXL
    peer with an agent's metadata can read and write all its registered memory."""
    if not authenticated:
        raise ValueError("rows by reference (nixl.enabled) needs authentication: configure bearer tokens "
                         "(auth_token_file / $ENCODER_SERVICE_TOKEN_FILE / $ENCODER_SERVICE_TOKEN)")


class RowLeases:
    def __init__(self, memory: list[torch.Tensor], settings: NixlSettings, give_back: Callable[[SharedReply], None]):
        """`memory`: the arenas (flat uint8 tensors) answers' rows live in; `give_back`: returns a reply's rows
        to the model process (`ModelProcess.release`)."""
        self.settings = settings
        self.agent = new_agent("encoder-pool", settings)
        self._table = np.zeros(SLOTS, dtype=np.uint64)
        self._registered = self.agent.register_memory([*memory, torch.from_numpy(self._table.view(np.uint8))])
        self.metadata = self.agent.get_agent_metadata()
        self._give_back = give_back
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._free = list(range(SLOTS - 1, -1, -1))
        self._tenant_bytes: dict[str, int] = {}
        self.stats = LeaseStats()
        self._busy_until = 0.0  # poll often until then (set by grants and releases)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="row-leases", daemon=True)
        self._thread.start()

    def grant(self, reply: SharedReply, tenant: str) -> RowsReference | None:
        """A lease on the reply's rows for `tenant` (the reply is then the lease's until it ends), or None when
        over a bound (the caller answers inline and gives the reply back itself)."""
        nbytes = reply.nbytes
        with self._lock:
            held = self._tenant_bytes.get(tenant, 0)
            if (not self._free or held + nbytes > self.settings.lease_mb_per_tenant << 20
                    or self.stats.bytes + nbytes > self.settings.lease_mb_total << 20):
                self.stats.refused += 1
                return None
            slot = self._free.pop()
            word = secrets.randbits(64) | 1
            self._table[slot] = word
            lease = Lease(secrets.token_hex(12), reply, tenant, nbytes, time.monotonic() + self.settings.lease_s, slot)
            self._leases[lease.id] = lease
            self._tenant_bytes[tenant] = held + nbytes
            self.stats.granted += 1
            self.stats.active += 1
            self.stats.bytes += nbytes
            self._busy_until = time.monotonic() + BUSY_FOR_S
        table = self._table.ctypes.data
        return RowsReference(self.agent.name, self.metadata, "DRAM",
                             [(s.data_ptr(), s.numel(), 0) for s in reply.segments], lease.id,
                             int((time.time() + self.settings.lease_s) * 1e3), (table + 8 * slot, 8, 0), word)

    def end(self, lease_id: str, expired: bool = False) -> bool:
        """End a lease: its check word cleared first, then its rows given back. False: no such lease."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                return False
            self._table[lease.slot] = 0
            self._free.append(lease.slot)
            self._tenant_bytes[lease.tenant] -= lease.nbytes
            if not self._tenant_bytes[lease.tenant]:
                del self._tenant_bytes[lease.tenant]
            self.stats.active -= 1
            self.stats.bytes -= lease.nbytes
            if expired:
                self.stats.expired += 1
            else:
                self.stats.released += 1
        self._give_back(lease.reply)
        return True

    def _run(self) -> None:
        """Read release notifications (UCX progresses meanwhile); end expired leases."""
        next_sweep = 0.0
        while not self._stop.wait(POLL_BUSY_S if time.monotonic() < self._busy_until else POLL_IDLE_S):
            try:  # whatever fails, the thread goes on: it is what ends leases and progresses readers' transfers
                for messages in self.agent.get_new_notifs().values():
                    for message in messages:
                        if (lease_id := released_lease(message)) is not None:
                            self.end(lease_id)
                            self._busy_until = time.monotonic() + BUSY_FOR_S
                now = time.monotonic()
                if now >= next_sweep:
                    next_sweep = now + 0.1
                    with self._lock:
                        expired = [lease.id for lease in self._leases.values() if lease.expires <= now]
                    for lease_id in expired:
                        self.end(lease_id, expired=True)
            except Exception:  # noqa: BLE001 - an unread release ends at expiry
                log.exception("the lease thread hit an error; it goes on")

    def close(self) -> None:
        """End every lease (their rows go back) and stop."""
        self._stop.set()
        self._thread.join(timeout=5)
        for lease_id in list(self._leases):
            self.end(lease_id, expired=True)
        try:
            self.agent.deregister_memory(self._registered)
        except Exception:  # noqa: BLE001
            log.debug("deregistering the arenas failed", exc_info=True)
