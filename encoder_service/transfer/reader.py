"""A consumer's side of rows by reference: read an answer's rows from the endpoint's memory with NIXL into
one tensor of the consumer's own (host or device), check the lease held for the whole read, give it back.

    reader = RowReader()                      # one per process (an agent, the endpoints it has met)
    result = client.encode(items, rows=pb.ROWS_BY_REFERENCE)   # rows: [0, hidden], result.reference
    rows = reader.read(result.reference, result.dtype, hidden)  # [sum(n_i), hidden]

A read whose lease ended before it finished (the rows may have been reused) raises LeaseExpired and the
rows are not returned; any other failure raises TransferFailed: callers ask again with rows inline.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict

import torch

from encoder_service.contract.reference import RowsReference, release_message
from encoder_service.transfer.nixl import NixlSettings, TransferFailed, new_agent, wait

log = logging.getLogger(__name__)

MAX_PEERS = 256  # endpoints remembered (a replaced replica is a new agent)


class LeaseExpired(TransferFailed):
    """The lease ended before the read did: the rows read are not trusted."""


class RowReader:
    def __init__(self, settings: NixlSettings | None = None):
        self.agent = new_agent("encoder-reader", settings)
        self._peers: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._abandoned: list = []  # reads that did not finish: their memory stays registered and alive
        self._releases: queue.Queue[RowsReference] = queue.Queue()
        threading.Thread(target=self._send_releases, name="row-reader-releases", daemon=True).start()
        self.reads = 0
        self.bytes = 0

    def _peer(self, ref: RowsReference) -> str:
        with self._lock:
            if ref.agent in self._peers:
                self._peers.move_to_end(ref.agent)
                return ref.agent
            try:
                name = self.agent.add_remote_agent(ref.agent_metadata)
            except Exception as e:  # noqa: BLE001 - nixl's error types
                raise TransferFailed(f"cannot load the endpoint's NIXL metadata: {e}") from e
            name = name.decode() if isinstance(name, bytes) else name
            if name != ref.agent:
                raise TransferFailed(f"the metadata is of agent {name!r}, not {ref.agent!r}")
            self._peers[name] = None
            while len(self._peers) > MAX_PEERS:
                old, _ = self._peers.popitem(last=False)
                self.agent.remove_remote_agent(old)
            return name

    def read(self, ref: RowsReference, dtype: torch.dtype, hidden_size: int, out: torch.Tensor | None = None,
             timeout_s: float = 30.0, release: bool = True) -> torch.Tensor:
        """The rows of `ref` as one [sum(n_i), hidden] tensor (`out`, or a new host tensor); the lease given
        back after (unless `release` is False: the caller calls `release`). Any failure is TransferFailed."""
        row_bytes = hidden_size * dtype.itemsize
        rows = ref.nbytes // row_bytes
        if ref.nbytes % row_bytes or any(length % row_bytes for _, length, _ in ref.segments):
            raise TransferFailed(f"the reference's segments are not whole rows of {hidden_size} x {dtype}")
        if out is None:
            out = torch.empty(rows, hidden_size, dtype=dtype)
        if tuple(out.shape) != (rows, hidden_size) or out.dtype != dtype or not out.is_contiguous():
            raise TransferFailed(f"out must be a contiguous {dtype} tensor of [{rows}, {hidden_size}]")
        memory = "VRAM" if out.is_cuda else "DRAM"
        device = (out.device.index or 0) if out.is_cuda else 0
        base, local, remote = out.data_ptr(), [], []
        for address, length, remote_device in ref.segments:
            if length:  # an item may have no rows
                local.append((base, length, device))
                remote.append((address, length, remote_device))
            base += length
        check = torch.zeros(8, dtype=torch.uint8)
        try:
            peer = self._peer(ref)
            registered = self.agent.register_memory([out.view(torch.uint8).reshape(-1), check] if ref.nbytes
                                                    else [check])
        except TransferFailed:
            raise
        except Exception as e:  # noqa: BLE001 - nixl's error types
            raise TransferFailed(f"preparing a NIXL read from {ref.agent}: {e}") from e
        try:
            if local:
                handle = self.agent.initialize_xfer("READ", self.agent.get_xfer_descs(local, memory),
                                                    self.agent.get_xfer_descs(remote, ref.memory), peer)
                wait(self.agent, handle, timeout_s, f"reading {ref.nbytes} bytes of rows from {peer}")
            handle = self.agent.initialize_xfer("READ", self.agent.get_xfer_descs([(check.data_ptr(), 8, 0)], "DRAM"),
                                                self.agent.get_xfer_descs([ref.check], ref.memory), peer)
            wait(self.agent, handle, timeout_s, f"checking the lease at {peer}")
        except Exception as e:  # noqa: BLE001 - a transfer may still be landing: its memory is never reused
            with self._lock:
                self._abandoned.append((registered, out, check))
            raise e if isinstance(e, TransferFailed) else TransferFailed(f"a NIXL read from {peer} failed: {e}")
        self.agent.deregister_memory(registered)
        if int.from_bytes(check.numpy().tobytes(), "little") != ref.check_word:
            raise LeaseExpired(f"lease {ref.lease_id} at {peer} ended before the read did")
        self.reads += 1
        self.bytes += ref.nbytes
        if release:
            self.release(ref)
        return out

    def release(self, ref: RowsReference) -> None:
        """Give the lease back, from a thread of this reader's (never on the caller's path; best effort: an
        unreleased lease ends at its expiry)."""
        self._releases.put(ref)

    def _send_releases(self) -> None:
        """Send queued releases; UCX progresses here (this agent has no progress thread), so they leave."""
        while True:
            try:
                ref = self._releases.get(timeout=0.05)
            except queue.Empty:
                ref = None
            try:
                if ref is not None:
                    self.agent.send_notif(self._peer(ref), release_message(ref.lease_id))
                self.agent.get_new_notifs()  # progress: a notification sent is on its way after this
            except Exception:  # noqa: BLE001
                log.debug("could not release lease %s", getattr(ref, "lease_id", "?"), exc_info=True)


_shared: RowReader | None = None
_shared_lock = threading.Lock()


def shared_reader(settings: NixlSettings | None = None) -> RowReader:
    """This process's reader (one agent per process), made on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = RowReader(settings)
        return _shared
