"""Helpers shared by the benchmarks: preset checkpoints, image mixes, device naming, timing."""

from __future__ import annotations

import io
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from encoder_service.config import PRESETS
from encoder_service.engine import EncoderEngine
from encoder_service.models import save_checkpoint
from encoder_service.models.checkpoint import random_encoder

# A serving-like mix: photos, screenshots, documents, thumbnails.
IMAGE_MIXES = {
    "serving": [(640, 480), (1920, 1080), (512, 512), (300, 800), (1024, 1024), (200, 200), (1280, 720), (800, 1200)],
    # Single-tile items (thumbnails, video frames): where packing across items matters most.
    "small": [(512, 512), (256, 256), (400, 380), (128, 128)],
    # 2:1 images: 2 tiles + thumbnail each.
    "wide": [(1024, 512), (800, 400), (1200, 600)],
}


# Measured 8192^3 bf16 matmul on random data (../shared/gpu/README.md): the MFU denominator.
BF16_PEAK_TFLOPS = {"H100": 798.0, "H200": 800.0}


def model_flops(engine: EncoderEngine, seq_lens: list[int], out_rows: int) -> float:
    """Matmul FLOPs of one pass: per ViT token 2(4D^2 + 2DI) per layer, attention 4 L D per token per
    layer, the patch embedder, and the projector per output row."""
    v, proj = engine.model.cfg.vision, engine.model.cfg.projector
    d, layers, tokens = v.hidden_size, v.num_layers, sum(seq_lens)
    mlp_ratio = v.intermediate_size / d
    per_layer = tokens * (8 + 4 * mlp_ratio) * d * d + 4 * d * sum(n * n for n in seq_lens)
    embed = 2 * tokens * 3 * v.patch_size**2 * d
    if proj is None:
        return layers * per_layer + embed
    width = d * proj.downsample**2
    return layers * per_layer + embed + 2 * out_rows * (width * proj.hidden_size + proj.hidden_size * proj.output_size)


def mfu(tflops: float, device: torch.device) -> float | None:
    """Model FLOP/s as a fraction of the device's measured bf16 matmul peak (None if unknown)."""
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device_name(device)), None)
    return round(tflops / peak, 3) if peak else None


def preset_checkpoint(preset: str, root: Path) -> Path:
    """Write a random checkpoint of a preset shape (weights random, layout real) and return its dir."""
    path = root / preset
    if not (path / "config.json").exists():
        save_checkpoint(random_encoder(PRESETS[preset](), seed=0), path)
    return path


def jpeg_mix(n: int, mix: str = "serving", seed: int = 0, sizes: list[tuple[int, int]] | None = None) -> list[bytes]:
    """n random-content JPEGs (quality 90) cycling through the sizes of `mix` (or `sizes`)."""
    rng = np.random.default_rng(seed)
    sizes = sizes or IMAGE_MIXES[mix]
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each fn, run in turn (A B A B ...) so clock/thermal drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def tree_cpu_s(root: int) -> float:
    """CPU time (user + system) of a process and its descendants, from /proc."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return sum(times.get(pid, 0.0) for pid in tree)
