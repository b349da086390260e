"""Where fetched rows wait for vLLM's workers (the bytes path; NIXL reads need none of this): one file per
item in a directory of shared memory, bounded in bytes, owned by one engine-core process.

- bounded: a fetch starts only once its bytes are reserved (`reserve`); the scheduler side sizes the area
  from vLLM's encoder-cache budget, so staged rows never outgrow what vLLM itself would hold;
- owned: the directory is `encoder-pool-ec-<pid>-<random>`; at start-up every such directory whose process
  is gone (a vLLM killed by SIGTERM or SIGKILL) is removed (`reclaim_stale`), and `close` removes this one;
- raw bytes, written once and read once (no pickle, no format of its own): the worker knows dtype and shape.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DIR_PREFIX = "encoder-pool-ec-"


def default_root() -> Path:
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(os.environ.get("TMPDIR", "/tmp"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reclaim_stale(root: Path) -> int:
    """Remove the staging directories of processes that no longer run; returns the bytes freed."""
    freed = 0
    for path in root.glob(DIR_PREFIX + "*"):
        try:
            pid = int(path.name[len(DIR_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            freed += sum(f.stat().st_size for f in path.glob("*") if f.is_file())
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed the staging directory %s of a vLLM that is gone (%d bytes)", path, freed)
    return freed


class StagingArea:
    def __init__(self, max_bytes: int, root: Path | None = None):
        root = root or default_root()
        self.reclaimed = reclaim_stale(root)
        self.dir = root / f"{DIR_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.dir.mkdir(parents=True)
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


def read_rows(path: str, rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """A staged item's rows as a [rows, hidden] tensor of the worker's own."""
    count = rows * hidden
    tensor = torch.from_file(path, shared=False, size=count * dtype.itemsize, dtype=torch.uint8)
    return tensor.view(dtype).view(rows, hidden)
