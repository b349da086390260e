"""Image preprocessing on the device: the building blocks of a GPU path (decode, resize, tile).

Why: on the H200 the CPU path (PIL decode + bicubic resize in worker processes) needs ~8 cores per
GPU to keep the encoder fed. Here JPEGs are decoded by nvJPEG (`torchvision.io.decode_jpeg` on
CUDA; other formats, and any file nvJPEG refuses, by the CPU path's decoder, which raises the CPU
path's errors) and resized on the device with Pillow's bicubic algorithm as its published C code
(`Resample.c`) runs it, in integer arithmetic (`pil_bicubic_resize`): coefficients computed as
Pillow computes them (support 2 x scale, a = -0.5, normalised, 22-bit fixed point), a horizontal
then a vertical pass, each rounded and clipped to uint8. Header parsing, the tiling plan and token
counts stay on the host (`ImageProcessor.plan`), so they never depend on the path.

Agreement with the CPU path, measured (tests/test_preprocess_device.py, bench/preprocess_numerics.py,
bench/RESULTS.md): from host-decoded pixels the device tiles equal the CPU path's bit for bit on the
GPU machine (its Pillow runs the published order); Pillow 13 (installed on the CPU machines) runs the
vertical pass first for some sizes, by a rule its published source does not show, so there the two
differ by the rounding between passes (at most 2 grey levels on the serving mix). nvJPEG's pixels
are far from libjpeg's (its chroma upsampling and conversion: mean 1.7 grey levels on smooth
images, embeddings 4.7 % off on radio-h), so a GPU path must decode on the host or with a decoder
that matches libjpeg. The pipeline does not use this path yet: it stays on the CPU path.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from encoder_service.errors import InvalidInput
from encoder_service.processor import ImageProcessor, ItemPlan, choose_grid

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images


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


def _resample_axis(x: torch.Tensor, axis: int, out_size: int) -> torch.Tensor:
    """One of Pillow's passes along `axis` of uint8 `x`: integer weighted sums, rounded, clipped to uint8.
    A gather per tap (not a dense matrix): memory stays ~ the output's size whatever the scale."""
    in_size = x.shape[axis]
    first, fixed = pil_coefficients(in_size, out_size)
    taps = fixed.shape[1]
    index = torch.from_numpy(np.minimum(first[:, None] + np.arange(taps)[None, :], in_size - 1)).to(x.device)
    weight = torch.from_numpy(fixed.astype(np.int32)).to(x.device)
    moved = x.movedim(axis, -1).to(torch.int32)
    acc = torch.full((*moved.shape[:-1], out_size), 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=x.device)
    for k in range(taps):
        acc += moved.index_select(-1, index[:, k]) * weight[:, k]
    return (acc >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8).movedim(-1, axis)


def pil_bicubic_resize(image: torch.Tensor, width: int, height: int, vertical_first: bool = False) -> torch.Tensor:
    """`image` uint8 [H, W, C] resized to [height, width, C] with Pillow's bicubic passes (each only when
    its size changes; horizontal first as its published code does, or `vertical_first`)."""
    passes = [(1, width), (0, height)]
    for axis, size in reversed(passes) if vertical_first else passes:
        if image.shape[axis] != size:
            image = _resample_axis(image, axis, size)
    return image


class DeviceImagePreprocessor:
    """An image's pieces as `ImageProcessor` lays them out, decoded and resized on `device`."""

    def __init__(self, processor: ImageProcessor, device: torch.device | str):
        self.processor, self.device = processor, torch.device(device)
        self.nvjpeg = self.device.type == "cuda" and _nvjpeg_available()
        self.host_decodes = 0  # images the device decoder left to the host (not JPEG, or refused)

    def decode(self, data: bytes) -> torch.Tensor:
        """uint8 [H, W, 3] on the device."""
        if self.nvjpeg and data[:3] == b"\xff\xd8\xff":
            try:
                from torchvision.io import ImageReadMode, decode_jpeg

                raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                return decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device).permute(1, 2, 0)
            except (RuntimeError, ValueError):  # nvJPEG refuses some valid files (CMYK, ...): the host decodes
                pass
        self.host_decodes += 1
        image = self.processor.load_image(data)  # InvalidInput for what the CPU path refuses
        return torch.from_numpy(np.array(image)).to(self.device)

    def resize(self, image: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """The checkpoint's resampling (`ProcessorConfig.resize`): Pillow's bicubic, or torch's antialiased
        bicubic (which the CPU path runs on the host)."""
        if self.processor.cfg.resize == "pil":
            return pil_bicubic_resize(image, width, height)
        if image.shape[:2] == (height, width):
            return image
        x = image.permute(2, 0, 1)[None]
        out = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", align_corners=False,
                                              antialias=True)
        return out[0].permute(1, 2, 0)

    def pixels(self, data: bytes, plan: ItemPlan) -> torch.Tensor:
        """An image's pieces, flat uint8 of `plan.nbytes` (the CPU path's layout), on the device."""
        image = self.decode(data)
        h, w = image.shape[:2]
        if self.processor.cfg.dynamic is not None:
            (th, tw), = plan.sizes
            return self.resize(image, tw, th).reshape(-1)
        t = self.processor.tiling.tile_size
        cols, rows = choose_grid(w, h, self.processor.tiling)
        resized = self.resize(image, cols * t, rows * t)
        tiles = resized.reshape(rows, t, cols, t, 3).transpose(1, 2).reshape(rows * cols, t, t, 3)
        if self.processor.tiling.use_thumbnail and rows * cols > 1:
            tiles = torch.cat([tiles, self.resize(image, t, t)[None]])
        if tiles.shape[0] != plan.num_tiles:
            raise InvalidInput(f"the image decoded to {w}x{h}, not the size its header gave")
        return tiles.reshape(-1)


def _nvjpeg_available() -> bool:
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or a build whose ops do not load
        return False
    return True
