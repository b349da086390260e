"""Helpers shared by the benchmarks: preset checkpoints, image mixes, device naming, timing."""

from __future__ import annotations

import io
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from encoder_service.config import PRESETS
from encoder_service.models import save_checkpoint
from encoder_service.models.checkpoint import random_encoder

# A serving-like mix: photos, screenshots, documents, thumbnails.
IMAGE_MIX = [(640, 480), (1920, 1080), (512, 512), (300, 800), (1024, 1024), (200, 200), (1280, 720), (800, 1200)]


def preset_checkpoint(preset: str, root: Path) -> Path:
    """Write a random checkpoint of a preset shape (weights random, layout real) and return its dir."""
    path = root / preset
    if not (path / "config.json").exists():
        save_checkpoint(random_encoder(PRESETS[preset](), seed=0), path)
    return path


def jpeg_mix(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = IMAGE_MIX[i % len(IMAGE_MIX)]
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
