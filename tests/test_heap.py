"""`serving.heap`: after `keep_large_buffers_in_heap`, a block above glibc's 32 MiB mmap ceiling comes
from the heap and the same memory serves the next one; by default each is a fresh mapping. Each case
runs in a process of its own (the setting is process-wide)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")

PROBE = r"""
import ctypes, json, sys, threading
from encoder_service.serving.heap import keep_large_buffers_in_heap

applied = keep_large_buffers_in_heap() if sys.argv[1] == "heap" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = int(sys.argv[2])

def heap_ranges():
    out = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if fields[-1] == "[heap]":
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi))
    return out

def twice():
    first = libc.malloc(size)
    in_heap = any(lo <= first < hi for lo, hi in heap_ranges())
    libc.free(ctypes.c_void_p(first))
    second = libc.malloc(size)
    libc.free(ctypes.c_void_p(second))
    return {"applied": applied, "allocated": bool(first and second), "in_heap": in_heap, "reused": first == second}

print(json.dumps(twice()))
# A thread's own arena cannot hold 200 MB (its heaps are 64 MiB at most) and may not map: malloc
# falls back to the main heap, it does not fail.
threaded = {}
thread = threading.Thread(target=lambda: threaded.update(twice()))
thread.start()
thread.join()
print(json.dumps(threaded))
"""


def _probe(mode: str, size: int) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode, str(size)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.parametrize("mb", [48, 200])
def test_large_blocks_come_from_the_heap_and_are_reused(mb):
    main_thread, other_thread = _probe("heap", mb << 20)
    assert main_thread == {"applied": True, "allocated": True, "in_heap": True, "reused": True}
    assert other_thread["allocated"] and other_thread["reused"]


def test_by_default_a_large_block_is_a_mapping_of_its_own():
    main_thread, _ = _probe("default", 48 << 20)
    assert main_thread["allocated"] and main_thread["in_heap"] is False
