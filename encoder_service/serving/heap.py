"""Large buffers from the reused heap, not from fresh mappings: why answers just above 32 MiB cost far more
than answers just below.

glibc's malloc hands out a block above its mmap threshold (which adapts, but to 32 MiB at most) as a
fresh `mmap`: the kernel zeroes and faults it in page by page as it is written, and `free` unmaps it.
An answer travels whole through several such blocks (the rows framed into a message, gRPC's copy of
it, the bytes received; on the CPU path the forward's activations too), so every answer above 32 MiB
paid that again on every call. Taking malloc's mmap away, and keeping the heap's free top instead of
trimming it, lets large blocks be reused as small ones are (bench/RESULTS.md, heap_buffers: the
cliff above 32 MiB is gone).

The price: memory a process freed stays with it (its RSS keeps near its high-water mark, with up to
`trim_threshold_bytes` free at the heap's top), so this is for processes that serve: the encoder
server, its model process, a Ray replica (`PipelineConfig.heap_large_buffers`). A client process that
receives answers above 32 MiB gains from it too (it is the caller's process, so nothing here sets it
there). Process-wide, from the call on; a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

DEFAULT_TRIM_THRESHOLD = 256 << 20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_large_buffers_in_heap(trim_threshold_bytes: int = DEFAULT_TRIM_THRESHOLD) -> bool:
    """From now on, this process's large mallocs come from the heap and go back to it; True where
    applied (glibc), False where this C library has no such setting."""
    libc = _glibc()
    if libc is None:
        return False
    applied = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold_bytes) == 1
    if not applied:
        log.warning("glibc refused mallopt: large buffers stay mmapped")
    return applied
