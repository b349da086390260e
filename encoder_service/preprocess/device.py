"""Resizing and tiling on the device: the CPU path's pixels, bit for bit, from decoded images.

Why: the CPU path (PIL decode + bicubic resize + tiling in worker processes) needs several cores per
GPU to keep the encoder fed, and most of that CPU time is the resize and tiling (bench/RESULTS.md,
preprocess). With `preprocess_device="cuda"` the workers only decode (libjpeg, as
the CPU path does: nvJPEG's pixels are far from libjpeg's, bench/RESULTS.md preprocess_numerics) into
the tile arena, and the model process resizes, tiles and makes the thumbnail here, on the device,
straight into the engine's input.

The resize is Pillow's bicubic as its published C code (`Resample.c`) runs it, in exact arithmetic:
coefficients computed as Pillow computes them (support 2 x scale, a = -0.5, normalised, 22-bit fixed
point), a horizontal then a vertical pass, each rounded and clipped to uint8. Each pass is one float64
matrix product with the pass's band matrix: every product and partial sum is an integer below 2^53,
so it is exact in any summation order, and a pass costs a handful of kernels whatever the scale.
Header parsing, the tiling plan and token counts stay on the host (`contract.plan`), so they
never depend on the path.

Agreement with the CPU path (tests/test_preprocess_device.py, bench/preprocess_numerics.py): equal
bit for bit where Pillow runs its published pass order (Pillow 12.3, the GPU machine); Pillow 13 (the
CPU machines) runs the vertical pass first for some sizes, by a rule its published source does not
show, and there the two differ by the rounding between passes (at most 2 grey levels on the serving mix).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch

from encoder_service.config import ProcessorConfig
from encoder_service.contract.errors import InvalidInput
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.contract.plan import ItemPlan
from encoder_service.contract.tokens import choose_grid
from encoder_service.preprocess.cpu import CpuPreprocessor

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
CHOICES = ("auto", "cpu", "cuda")
_CHUNK_BYTES = 128 << 20  # float64 rows of one pass at a time, at most (huge images go in row blocks)


def resolve(setting: str, engine_device: torch.device, processor: ProcessorConfig) -> torch.device | None:
    """Where images are resized and tiled: the engine's CUDA device, or None for the CPU path.

    auto: the device whenever the engine runs on CUDA and the checkpoint resamples with Pillow's bicubic
    (exact there: the same rows); the CPU path otherwise. The device path serves more tiles/s than the
    CPU path for a fraction of the CPU time (bench/RESULTS.md, preprocess). Videos keep the CPU path either way (decoded frame by frame by PyAV)."""
    if setting not in CHOICES:
        raise ValueError(f"unknown preprocess_device {setting!r}; choose {', '.join(CHOICES)}")
    if setting == "cpu" or (setting == "auto" and (engine_device.type != "cuda" or processor.resize != "pil")):
        return None
    if engine_device.type != "cuda":
        raise ValueError(f"preprocess_device=cuda needs the engine on CUDA (it runs on {engine_device})")
    if processor.resize != "pil":
        raise ValueError(f"preprocess_device=cuda reproduces Pillow's bicubic only; this checkpoint resamples "
                         f"with {processor.resize!r}: use cpu")
    return engine_device


def on_device(item: MediaInput) -> bool:
    """Items the device path takes: images (encoded or raw pixels). Videos stay on the CPU path."""
    return item.modality == Modality.IMAGE


def host_decoded(processor: CpuPreprocessor, item: MediaInput, plan: ItemPlan, device: torch.device | str) -> torch.Tensor:
    """An image decoded on the host, by the CPU path's decoder, as uint8 [H, W, 3] on `device`."""
    decoded = np.empty(plan.decoded_nbytes, dtype=np.uint8)
    processor.decode_into(item, decoded)
    return torch.from_numpy(decoded).to(device).view(*plan.image_size, 3)


# ---------------------------------------------------------------- Pillow's bicubic


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic filter (a = -0.5), on float64 like its C code."""
    a = -0.5
    x = np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1,
                    np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@lru_cache(maxsize=256)
def pil_coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(first input index [out], fixed-point weights [out, taps]) as Pillow's `precompute_coeffs` and
    `normalize_coeffs_8bpc` make them for resizing `in_size` samples to `out_size`."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    first = np.zeros(out_size, dtype=np.int64)
    weights = np.zeros((out_size, taps), dtype=np.float64)
    ss = 1.0 / filterscale
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - xmin
        w = _bicubic(((np.arange(count) + xmin) - center + 0.5) * ss)
        total = 0.0
        for value in w:  # summed in order, as the C loop does
            total += value
        weights[xx, :count] = w / total if total != 0.0 else w
        first[xx] = xmin
    scaled = weights * (1 << PRECISION_BITS)
    fixed = np.where(weights < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return first, fixed


def band_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The pass as a float64 [in, out] matrix of Pillow's fixed-point weights (zero outside each band)."""
    first, fixed = pil_coefficients(in_size, out_size)
    matrix = np.zeros((in_size, out_size), dtype=np.float64)
    for k in range(fixed.shape[1]):
        index = first + k
        valid = (index < in_size) & (fixed[:, k] != 0)
        matrix[index[valid], np.nonzero(valid)[0]] = fixed[valid, k]
    return matrix


class _Bands:
    """Band matrices on one device, by (in, out): an image size's matrices are made and copied once, and
    kept (least recently used first out) within `max_bytes` of device memory, taken from the ViT's."""

    def __init__(self, device: torch.device, max_bytes: int = 256 << 20):
        self.device, self.max_bytes = device, max_bytes
        self._cache: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the in-process path tiles from several threads

    def get(self, in_size: int, out_size: int) -> torch.Tensor:
        key = (in_size, out_size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        host = torch.from_numpy(band_matrix(in_size, out_size))
        if self.device.type == "cuda":  # from pinned memory: no implicit stream synchronisation
            host = host.pin_memory()
        matrix = host.to(self.device, non_blocking=True)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = matrix
                self._bytes += matrix.numel() * matrix.element_size()
            while self._bytes > self.max_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
        return matrix


def _resample_last_axis(x: torch.Tensor, bands: torch.Tensor) -> torch.Tensor:
    """Pillow's pass along the last axis of uint8 `x`: exact integer sums (float64), rounded, clipped."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape[0], bands.shape[1], dtype=torch.uint8, device=x.device)
    step = max(1, _CHUNK_BYTES // (8 * max(x.shape[-1], bands.shape[1])))
    for start in range(0, rows.shape[0], step):
        acc = rows[start : start + step].to(torch.float64) @ bands
        acc.add_(1 << (PRECISION_BITS - 1)).div_(1 << PRECISION_BITS).floor_().clamp_(0, 255)
        out[start : start + step] = acc.to(torch.uint8)
    return out.reshape(*x.shape[:-1], bands.shape[1])


def pil_bicubic_resize(image: torch.Tensor, width: int, height: int, vertical_first: bool = False,
                       bands: _Bands | None = None) -> torch.Tensor:
    """`image` uint8 [H, W, C] resized to [height, width, C] with Pillow's bicubic passes (each only when
    its size changes; horizontal first as its published code does, or `vertical_first`)."""
    bands = bands or _Bands(image.device)
    passes = ["w", "h"] if not vertical_first else ["h", "w"]
    for axis in passes:
        if axis == "w" and image.shape[1] != width:  # [H, W, C] -> [H, C, W] -> rows of W
            moved = image.permute(0, 2, 1)
            image = _resample_last_axis(moved, bands.get(image.shape[1], width)).permute(0, 2, 1)
        elif axis == "h" and image.shape[0] != height:  # [H, W, C] -> [W, C, H]
            moved = image.permute(1, 2, 0)
            image = _resample_last_axis(moved, bands.get(image.shape[0], height)).permute(2, 0, 1)
    return image.contiguous()


# ---------------------------------------------------------------- tiles from a decoded image


class DeviceTiler:
    """An image's pieces as `CpuPreprocessor` lays them out (tiles row-major, then the thumbnail; or one
    dynamic-resolution piece), resized on `device` from its decoded RGB pixels."""

    def __init__(self, processor: ProcessorConfig, device: torch.device | str):
        if processor.resize != "pil":
            raise ValueError("the device path reproduces Pillow's bicubic only")
        self.cfg, self.device = processor, torch.device(device)
        self._bands = _Bands(self.device)

    def pieces(self, image: torch.Tensor, plan: ItemPlan) -> torch.Tensor:
        """`image` uint8 [H, W, 3] on the device -> flat uint8 of `plan.nbytes` (the CPU path's layout)."""
        h, w = image.shape[:2]
        if self.cfg.dynamic is not None:
            (th, tw), = plan.sizes
            return self._resize(image, tw, th).reshape(-1)
        tiling = self.cfg.tiling
        t = tiling.tile_size
        cols, rows = choose_grid(w, h, tiling)
        if rows * cols + (tiling.use_thumbnail and rows * cols > 1) != plan.num_tiles:
            raise InvalidInput(f"the image decoded to {w}x{h}, not the size its header gave")
        resized = self._resize(image, cols * t, rows * t)
        tiles = resized.reshape(rows, t, cols, t, 3).transpose(1, 2).reshape(-1)
        if tiling.use_thumbnail and rows * cols > 1:
            tiles = torch.cat([tiles, self._resize(image, t, t).reshape(-1)])
        return tiles

    def _resize(self, image: torch.Tensor, width: int, height: int) -> torch.Tensor:
        return pil_bicubic_resize(image, width, height, bands=self._bands)


def decode_nvjpeg(data: bytes, device: torch.device | str) -> torch.Tensor:
    """uint8 [H, W, 3] decoded by nvJPEG (torchvision) on the device. Not used for serving: its pixels
    differ from libjpeg's (kept for bench.preprocess_numerics, which measures by how much)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_jpeg(raw, mode=ImageReadMode.RGB, device=torch.device(device)).permute(1, 2, 0)
