"""Where fetched rows wait for vLLM's workers (the bytes path; NIXL reads need none of this): one file per
item in a directory of shared memory, bounded in bytes, owned by one engine-core process.

- bounded: a fetch starts only once its bytes are reserved (`reserve`); the scheduler side sizes the area
  from vLLM's encoder-cache budget, so staged rows never outgrow what vLLM itself would hold;
- owned: the directory is `encoder-pool-ec-<pid>-<random>`, and its owner holds an exclusive lock on its
  `.owner` file for as long as it runs (the kernel drops it when the process dies, however it dies). At
  start-up every such directory whose lock can be taken (its owner is gone: a vLLM killed by SIGTERM or
  SIGKILL) is removed (`reclaim_stale`), and `close` removes this one. A lock, not a pid: several vLLMs may
  share /dev/shm across PID namespaces (containers with --ipc=host), where a pid says nothing;
- raw bytes, written once and read once (no pickle, no format of its own): the worker knows dtype and shape.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DIR_PREFIX = "encoder-pool-ec-"


def default_root() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(os.environ.get("TMPDIR", "/tmp"))


OWNER = ".owner"


ORPHAN_AGE_S = 60.0  # a directory without an owner's lock this old was never finished (or predates the lock)


def _owner_gone(path: Path) -> bool:
    """Whether the directory's owner no longer runs: its lock can be taken (then it is held until removal).
    A directory is locked before it becomes visible; one without a lock file is a start that died half-way
    (hidden) or an older connector's, stale once it is ORPHAN_AGE_S old."""
    try:
        fd = os.open(path / OWNER, os.O_RDWR)
    except FileNotFoundError:
        try:
            return time.time() - path.stat().st_mtime > ORPHAN_AGE_S
        except FileNotFoundError:  # removed meanwhile
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def reclaim_stale(root: Path) -> int:
    """Remove the staging directories whose owners no longer run; returns the bytes freed."""
    freed = 0
    for path in [*root.glob(DIR_PREFIX + "*"), *root.glob("." + DIR_PREFIX + "*")]:
        if path.is_dir() and _owner_gone(path):
            size = sum(f.stat().st_size for f in path.glob("*") if f.is_file())
            shutil.rmtree(path, ignore_errors=True)
            freed += size
            log.warning("removed the staging directory %s of a vLLM that is gone (%d bytes)", path, size)
    return freed


class StagingArea:
    def __init__(self, max_bytes: int, root: Path | None = None):
        root = root or default_root()
        self.reclaimed = reclaim_stale(root)
        partial = root / f".{DIR_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        partial.mkdir(parents=True)
        self._owner = os.open(partial / OWNER, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._owner, fcntl.LOCK_EX)  # held for this process's life
        self.dir = root / partial.name[1:]
        os.rename(partial, self.dir)  # found by reclaim_stale only once locked
        self.max_bytes = max_bytes
        self.reserved = 0  # bytes reserved for fetches in flight and items staged
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        """Room for `nbytes` more, or False (the caller waits); an item larger than the whole area gets it when
        the area is empty, so no item waits forever."""
        with self._lock:
            if self.reserved + nbytes > self.max_bytes and self.reserved:
                return False
            self.reserved += nbytes
            return True

    def unreserve(self, nbytes: int) -> None:
        with self._lock:
            self.reserved -= nbytes

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.rows"

    def write(self, name: str, rows: torch.Tensor) -> str:
        """The rows' bytes in a file of their own (written under a temporary name, then renamed)."""
        path = self.path(name)
        partial = path.with_suffix(".partial")
        rows.contiguous().view(torch.uint8).numpy().tofile(partial)
        os.replace(partial, path)
        return str(path)

    def remove(self, name: str, nbytes: int) -> None:
        self.path(name).unlink(missing_ok=True)
        self.unreserve(nbytes)

    def staged_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.dir.glob("*.rows"))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._owner)


def read_rows(path: str, rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """A staged item's rows as a [rows, hidden] tensor of the worker's own."""
    count = rows * hidden
    tensor = torch.from_file(path, shared=False, size=count * dtype.itemsize, dtype=torch.uint8)
    return tensor.view(dtype).view(rows, hidden)
