"""Shared memory between the serving processes, with a first-fit allocator.

Two arenas carry the bulk of the data, so it never travels through a pipe:
- tiles (~0.8 MB per 512 px tile): preprocessing workers write them at an offset the model
  process allocated, and the device copies them straight from there;
- embeddings (31 MB for two images at LLM width 5120 in bf16): the device writes each
  request's rows into the output arena, and the transport process reads them in place.
A region is an anonymous memfd (no /dev/shm file to leak, no /dev/shm size limit in a
container), shared by passing its file descriptor; the process that owns the allocator
allocates and frees, the others only map it (`SharedArena(size, fd=...)`).

The allocator is also backpressure: bytes waiting in an arena are bounded by its size, and an
allocation waits for space.
"""

from __future__ import annotations

import bisect
import mmap
import os
import tempfile
import threading
import time
from typing import Callable

ALIGNMENT = 4096


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


class SharedArena:
    def __init__(self, nbytes: int, name: str = "encoder-arena", fd: int | None = None):
        """A new region of `nbytes`, or (`fd` given) the region another process created."""
        self.size = _align(max(nbytes, ALIGNMENT))
        if fd is not None:
            self.fd = fd
        elif hasattr(os, "memfd_create"):
            self.fd = os.memfd_create(name)
            os.ftruncate(self.fd, self.size)
        else:  # not Linux: an unlinked temporary file serves the same purpose
            handle, path = tempfile.mkstemp(prefix=f"{name}-")
            os.unlink(path)
            self.fd = handle
            os.ftruncate(self.fd, self.size)
        self.buf = mmap.mmap(self.fd, self.size)
        self._free: list[tuple[int, int]] = [(0, self.size)]  # (offset, size), sorted by offset
        self._used: dict[int, int] = {}
        self._cond = threading.Condition()

    @property
    def bytes_in_use(self) -> int:
        with self._cond:
            return sum(self._used.values())

    def fits(self, nbytes: int) -> bool:
        """Whether an allocation of `nbytes` could ever succeed (when the arena is empty)."""
        return _align(nbytes) <= self.size

    @staticmethod
    def footprint(nbytes: int) -> int:
        """Bytes an allocation of `nbytes` takes (aligned)."""
        return _align(max(nbytes, 1))

    def alloc(self, nbytes: int, keep_waiting: Callable[[], bool] = lambda: True, poll_s: float = 0.05) -> int | None:
        """First-fit allocation; waits for space while `keep_waiting()` holds. Returns the offset, or
        None once `keep_waiting()` turns false (e.g. the request was cancelled while it waited)."""
        need = _align(max(nbytes, 1))
        if need > self.size:
            raise ValueError(f"{nbytes} bytes can never fit an arena of {self.size}")
        with self._cond:
            while True:
                for i, (offset, size) in enumerate(self._free):
                    if size >= need:
                        if size == need:
                            del self._free[i]
                        else:
                            self._free[i] = (offset + need, size - need)
                        self._used[offset] = need
                        return offset
                if not keep_waiting():
                    return None
                self._cond.wait(poll_s)

    def free(self, offset: int) -> None:
        with self._cond:
            size = self._used.pop(offset)
            i = bisect.bisect(self._free, (offset, size))
            self._free.insert(i, (offset, size))
            # Coalesce with the right and then the left neighbour.
            if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:
                size += self._free.pop(i + 1)[1]
                self._free[i] = (offset, size)
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
                prev_offset, prev_size = self._free.pop(i - 1)
                self._free[i - 1] = (prev_offset, prev_size + size)
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is allocated (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._used:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def close(self) -> None:
        """Unmap and close (once: a second call does nothing)."""
        if self.fd is None:
            return
        try:
            self.buf.close()
        except BufferError:  # views still exported (tensors alive); the mapping goes with the process
            pass
        os.close(self.fd)
        self.fd = None
