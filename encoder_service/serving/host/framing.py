"""Length-prefixed msgpack frames over pipes: how serving processes talk to their children
(preprocessing workers, the model process). msgpack, never pickle: a frame is data only."""

from __future__ import annotations

import os
import struct
from typing import Any

import msgpack

_LENGTH = struct.Struct("<Q")


def write_frame(fd: int, message: Any) -> None:
    """Write one message (anything msgpack packs; bytes and memoryviews travel as raw bytes)."""
    payload = msgpack.packb(message)
    view = memoryview(_LENGTH.pack(len(payload)) + payload)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None  # the other side is gone
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> Any | None:
    """The next message, or None once the writer has closed its end."""
    header = _read_exact(fd, _LENGTH.size)
    if header is None:
        return None
    body = _read_exact(fd, _LENGTH.unpack(header)[0])
    return None if body is None else msgpack.unpackb(body)
