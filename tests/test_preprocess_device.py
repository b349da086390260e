"""The device preprocessing blocks against the CPU path (Pillow), on whatever device is here (the CPU in
CI; tests/test_gpu.py-style runs on the GPU machine use CUDA and nvJPEG)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from encoder_service.config import ProcessorConfig, TilingSpec
from encoder_service.preprocess_device import DeviceImagePreprocessor, pil_bicubic_resize
from encoder_service.processor import ImageProcessor, MediaInput, Modality

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pil(arr: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.BICUBIC))


def test_one_axis_resizes_equal_pillow_bit_for_bit():
    rng = np.random.default_rng()
    for _ in range(60):
        w, h, out = (int(v) for v in rng.integers(1, 400, 3))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        x = torch.from_numpy(arr).to(DEVICE)
        assert np.array_equal(pil_bicubic_resize(x, out, h).cpu().numpy(), _pil(arr, out, h)), (w, h, out)
        assert np.array_equal(pil_bicubic_resize(x, w, out).cpu().numpy(), _pil(arr, w, out)), (w, h, out)


def test_two_axis_resizes_equal_pillow_in_one_of_its_two_pass_orders():
    """Pillow 13 runs the vertical pass first for some sizes (the published Resample.c never does); every
    result is one of the two orders, bit for bit, and the orders differ only by the rounding between them."""
    rng = np.random.default_rng()
    orders = {False: 0, True: 0}
    for _ in range(60):
        w, h, ow, oh = (int(v) for v in rng.integers(2, 300, 4))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        x = torch.from_numpy(arr).to(DEVICE)
        reference = _pil(arr, ow, oh)
        matches = [first for first in (False, True)
                   if np.array_equal(pil_bicubic_resize(x, ow, oh, vertical_first=first).cpu().numpy(), reference)]
        assert matches, (w, h, ow, oh)
        orders[matches[0]] += 1
    assert orders[False] > 0


def _jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    smooth = np.kron(rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w].astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def test_device_tiles_follow_the_cpu_paths_plan_and_layout():
    """Tiles, thumbnail and layout as the CPU path makes them, from host-decoded pixels: exact where the
    resize is one-axis (the thumbnail of a 2:1 image, tiles at their own size); PNG decodes on the host;
    bad data is InvalidInput. (nvJPEG's own pixels are further off: bench/RESULTS.md, preprocess_numerics.)"""
    processor = ImageProcessor(ProcessorConfig(tiling=TilingSpec(tile_size=64, tokens_per_tile=16)))
    device = DeviceImagePreprocessor(processor, DEVICE)
    device.nvjpeg = False
    rng = np.random.default_rng()
    exact = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)  # 2 x 1 tiles at their size + a one-axis thumbnail
    png = io.BytesIO()
    Image.fromarray(exact).save(png, format="PNG")
    item = MediaInput(Modality.IMAGE, png.getvalue())
    plan = processor.plan(item)
    assert torch.equal(device.pixels(item.data, plan).cpu(), torch.from_numpy(processor.process(item).pixels))
    assert device.host_decodes == 1
    for w, h in [(300, 200), (640, 480), (50, 300)]:
        jpeg = MediaInput(Modality.IMAGE, _jpeg(w, h, seed=w))
        plan = processor.plan(jpeg)
        ours = device.pixels(jpeg.data, plan).cpu().numpy().astype(int)
        theirs = processor.process(jpeg).pixels.astype(int)
        assert ours.shape == theirs.shape == (plan.nbytes,)
        assert np.abs(ours - theirs).mean() < 2.0  # decode and pass order aside, the same pixels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a GPU")
def test_nvjpeg_decodes_and_refused_files_fall_back_to_the_host_without_hurting_the_device():
    from encoder_service.errors import InvalidInput

    processor = ImageProcessor(ProcessorConfig(tiling=TilingSpec(tile_size=64, tokens_per_tile=16)))
    device = DeviceImagePreprocessor(processor, "cuda")
    assert device.nvjpeg
    data = _jpeg(300, 200, seed=3)
    assert tuple(device.decode(data).shape) == (200, 300, 3) and device.host_decodes == 0
    with pytest.raises(InvalidInput):  # truncated: nvJPEG refuses, the host's decoder names the problem
        device.pixels(data[:200], processor.plan(MediaInput(Modality.IMAGE, data)))
    assert device.host_decodes == 1
    assert tuple(device.decode(data).shape) == (200, 300, 3)  # the device still works
