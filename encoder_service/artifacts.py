"""Embedded default artifacts (tiny random checkpoints) materialised once in a cache dir.

Generated from fixed seeds, so every process (replica, worker, test) builds identical files;
nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def cache_root(root: str | os.PathLike | None = None) -> Path:
    return Path(root or os.environ.get("ENCODER_SERVICE_CACHE", Path.home() / ".cache" / "encoder_service"))


def build_once(path: Path, write: Callable[[Path], object], marker: str = "config.json") -> Path:
    """Run `write(tmp_dir)` and atomically rename it to `path`, unless `path/marker` exists."""
    if (path / marker).exists():
        return path
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return path
