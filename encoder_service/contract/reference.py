"""Rows by reference: where an answer's rows are in an endpoint's memory, for a NIXL READ, and the lease
that holds them there (`protos/encoder.proto`, `Rows.ROWS_BY_REFERENCE`, says the protocol)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

Segment = tuple[int, int, int]  # (address, length in bytes, device id)


@dataclass(frozen=True)
class RowsReference:
    agent: str  # the endpoint's NIXL agent
    agent_metadata: bytes  # what a reader loads to reach it
    memory: str  # "DRAM" or "VRAM"
    segments: list[Segment]  # one per item, in item order
    lease_id: str
    expires_unix_ms: int
    check: Segment  # 8 bytes that hold `check_word` while the lease is alive
    check_word: int
    nbytes: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "nbytes", sum(length for _, length, _ in self.segments))

    def seconds_left(self) -> float:
        return self.expires_unix_ms / 1e3 - time.time()


def release_message(lease_id: str) -> bytes:
    """The NIXL notification that gives a lease back."""
    return b"release:" + lease_id.encode()


def released_lease(message: bytes) -> str | None:
    """The lease a notification gives back, or None if it is not a release."""
    return message[8:].decode(errors="replace") if message.startswith(b"release:") else None
