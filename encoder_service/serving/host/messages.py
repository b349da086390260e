"""What the transport and its model process say to each other, as typed messages over a pipe
(`framing`: length-prefixed msgpack, never pickle). Each is a dataclass; `send` tags it with its name
and `receive` rebuilds it, so neither side writes dict literals.

Parent -> child: Encode, Cancel, Release, ReleaseItems, StatsQuery.
Child -> parent: Ready or StartFailed once, then per call exactly one Answer, Failure or Stats, and for a
streamed call StreamStarted and one ItemReady per item before its Answer or Failure.
A segment is (arena id, offset, bytes) of rows in the shared arenas (`rows.OUTPUTS`, `rows.CACHE`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from encoder_service.contract.errors import EncodeFailed
from encoder_service.serving.host.framing import read_frame, write_frame

Segment = tuple[int, int, int]


@dataclass
class Encode:
    id: int
    request: bytes  # a serialised EncodeRequest, parsed and validated by the child
    deadline: float | None  # time.monotonic() instant (one clock for the processes of a host)
    extras: dict | None = None  # merged into the answer's extras
    namespace: str = ""  # the tenant's cache namespace
    stream: bool = False  # tell each item as it is ready (StreamStarted, ItemReady)


@dataclass
class Cancel:
    id: int


@dataclass
class Release:
    """The parent has sent an Answer's rows: they go back."""

    id: int


@dataclass
class ReleaseItems:
    """The parent is done with a streamed call's items: every ItemReady's rows go back, no more are told."""

    id: int


@dataclass
class StatsQuery:
    id: int


@dataclass
class Ready:
    info: bytes  # serialised ModelInfo
    outputs_pinned: bool


@dataclass
class StartFailed:
    error: str


@dataclass
class Answer:
    id: int
    header: bytes  # serialised EncodeResponse without the tensor's bytes
    segments: list[Segment]  # each item's rows, in item order
    items: int
    rows: int


@dataclass
class Failure:
    id: int
    code: str  # gRPC status name
    message: str
    item_index: int | None = None
    item_id: str = ""
    missing: list[tuple[int, str]] = field(default_factory=list)
    retry_after_ms: int | None = None
    reason: str = ""

    @classmethod
    def of(cls, call: int, error: EncodeFailed) -> "Failure":
        return cls(call, error.code, error.message, error.item_index, error.item_id, error.missing,
                   error.retry_after_ms, error.reason)

    def error(self) -> EncodeFailed:
        return EncodeFailed(self.code, self.message, self.item_index, self.item_id, [tuple(m) for m in self.missing],
                            self.retry_after_ms, self.reason)


@dataclass
class Stats:
    id: int
    stats: dict[str, Any]


@dataclass
class StreamStarted:
    id: int
    counts: list[int]  # every item's row count
    model: str  # the model's contract digest
    request_id: str


@dataclass
class ItemReady:
    id: int
    index: int
    meta: bytes  # serialised ItemMetadata
    segment: Segment


KINDS = {cls.__name__: cls for cls in (Encode, Cancel, Release, ReleaseItems, StatsQuery, Ready, StartFailed,
                                       Answer, Failure, Stats, StreamStarted, ItemReady)}


def send(fd: int, message) -> None:
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}  # shallow: no byte copies
    write_frame(fd, {"kind": type(message).__name__, **fields})


def receive(fd: int):
    """The next message, or None once the other side has closed its end."""
    frame = read_frame(fd)
    if frame is None:
        return None
    return KINDS[frame.pop("kind")](**frame)
