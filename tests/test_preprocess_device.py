"""Resizing and tiling on the device (`preprocess_device`) against the CPU path (Pillow), and the serving
pipeline with it: on whatever device is here (the CPU in CI, where the device path runs through a tiler on
the CPU; CUDA on the GPU machine, where it runs as deployed)."""

from __future__ import annotations

import io

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from encoder_service.config import EngineConfig, ProcessorConfig
from encoder_service.contract.errors import InvalidInput, ItemError, Unavailable
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.contract.tokens import TilingSpec
from encoder_service.engine import EncoderEngine
from encoder_service.preprocess import device as preprocess_device
from encoder_service.preprocess.cpu import CpuPreprocessor
from encoder_service.preprocess.device import DeviceTiler, pil_bicubic_resize
from encoder_service.serving.host.pipeline import EncodePipeline, PipelineConfig
from encoder_service.serving.host.rows import OUTPUTS
from tests.conftest import image_bytes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Pillow 12 resizes horizontally first, as its published code does (the GPU machine); Pillow 13 not always.
PUBLISHED_PASS_ORDER = int(PIL.__version__.split(".")[0]) < 13


def _pil(arr: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.BICUBIC))


def test_one_axis_resizes_equal_pillow_bit_for_bit():
    rng = np.random.default_rng()
    cases = [tuple(int(v) for v in rng.integers(1, 400, 3)) for _ in range(50)]
    cases += [(2000, 7, 37), (1, 5, 900), (3000, 3, 512)]  # large down- and upscales: many taps, one tap
    for w, h, out in cases:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        x = torch.from_numpy(arr).to(DEVICE)
        assert np.array_equal(pil_bicubic_resize(x, out, h).cpu().numpy(), _pil(arr, out, h)), (w, h, out)
        assert np.array_equal(pil_bicubic_resize(x.transpose(0, 1), h, out).cpu().numpy(),
                              _pil(np.ascontiguousarray(arr.transpose(1, 0, 2)), h, out)), (w, h, out)


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


def _host_decoded(processor: CpuPreprocessor, item: MediaInput) -> torch.Tensor:
    return preprocess_device.host_decoded(processor, item, processor.planner.plan(item), DEVICE)


def test_device_tiles_follow_the_cpu_paths_plan_and_layout():
    """Tiles, thumbnail and layout as the CPU path makes them, from host-decoded pixels: exact where the
    resize is one-axis (the thumbnail of a 2:1 image, tiles at their own size), else within Pillow 13's
    pass-order rounding; dynamic resolution's single piece likewise."""
    processor = CpuPreprocessor(ProcessorConfig(tiling=TilingSpec(tile_size=64, tokens_per_tile=16)))
    tiler = DeviceTiler(processor.cfg, DEVICE)
    exact = MediaInput(Modality.IMAGE, image_bytes(128, 64))  # 2 x 1 tiles at their size + a one-axis thumbnail
    plan = processor.planner.plan(exact)
    assert torch.equal(tiler.pieces(_host_decoded(processor, exact), plan).cpu(),
                       torch.from_numpy(processor.process(exact).pixels))
    for w, h in [(300, 200), (640, 480), (50, 300)]:
        item = MediaInput(Modality.IMAGE, _jpeg(w, h, seed=w))
        plan = processor.planner.plan(item)
        ours = tiler.pieces(_host_decoded(processor, item), plan).cpu().numpy().astype(int)
        theirs = processor.process(item).pixels.astype(int)
        assert ours.shape == theirs.shape == (plan.nbytes,)
        diff = np.abs(ours - theirs)
        if PUBLISHED_PASS_ORDER:
            assert diff.max() == 0
        else:  # the rounding between passes, amplified by bicubic's overshoot at these images' hard edges
            assert diff.mean() < 0.25 and diff.max() <= 8


def test_where_images_are_tiled_is_decided_once_and_refused_when_it_cannot_be_exact():
    pil, torch_aa = ProcessorConfig(), ProcessorConfig(resize="torch-aa")
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert preprocess_device.resolve("auto", cuda, pil) == cuda
    assert preprocess_device.resolve("auto", cpu, pil) is None
    assert preprocess_device.resolve("auto", cuda, torch_aa) is None  # not reproduced exactly: the CPU path
    assert preprocess_device.resolve("cpu", cuda, pil) is None
    with pytest.raises(ValueError, match="needs the engine on CUDA"):
        preprocess_device.resolve("cuda", cpu, pil)
    with pytest.raises(ValueError, match="Pillow's bicubic only"):
        preprocess_device.resolve("cuda", cuda, torch_aa)
    with pytest.raises(ValueError, match="unknown preprocess_device"):
        preprocess_device.resolve("gpu", cuda, pil)


# ---------------------------------------------------------------- the serving pipeline with the device path


def _device_engine(engine_config: EngineConfig) -> EncoderEngine:
    """The engine as `preprocess_device=cuda` makes it; on a CPU machine its tiler runs on the CPU (the
    configuration refuses `cuda` there), so CI runs the pipeline's device path too."""
    engine = EncoderEngine(EngineConfig(**{**engine_config.__dict__, "device": DEVICE, "dtype": "float32",
                                           "preprocess_device": "cuda" if DEVICE == "cuda" else "cpu"}))
    if engine.device_tiler is None:
        engine.device_tiler = DeviceTiler(engine.preprocessor.cfg, DEVICE)
    return engine


def _bad_images() -> dict[str, bytes]:
    """The hostile and unusual inputs the CPU path handles, as the device path gets them."""
    rng = np.random.default_rng()
    pixels = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    out = {}
    truncated = image_bytes(300, 200, "JPEG", seed=1)
    out["truncated"] = truncated[: len(truncated) // 3]
    out["corrupt"] = b"\xff\xd8\xff" + bytes(rng.integers(0, 256, 500, dtype=np.uint8))
    for name, image, kwargs in [("cmyk", Image.fromarray(pixels).convert("CMYK"), {"format": "JPEG"}),
                                ("progressive", Image.fromarray(pixels), {"format": "JPEG", "progressive": True}),
                                ("palette", Image.fromarray(pixels).convert("P"), {"format": "PNG"}),
                                ("grey16", Image.fromarray((pixels[..., 0].astype(np.uint16) << 8) | 7), {"format": "PNG"}),
                                ("huge", Image.new("L", (9000, 8000)), {"format": "JPEG"})]:
        buf = io.BytesIO()
        image.save(buf, **kwargs)
        out[name] = buf.getvalue()
    return out


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit for bit on the CPU; on CUDA the pipeline's batches differ from the in-process path's, and a
    batch's composition picks other matmul kernels (rounding only)."""
    if DEVICE == "cpu":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-4, atol=1e-4)


def _outcome(encode) -> tuple[str, str] | torch.Tensor:
    """The rows, or the error's kind and message (refused at admission or while decoding)."""
    try:
        return encode().result(timeout=120).embeddings
    except ItemError as e:
        return type(e).__name__, str(e)


def test_pipeline_with_device_tiling_equals_the_in_process_path_and_fails_items_as_the_cpu_path(engine_config):
    """Workers only decode; the device tiles. The rows equal the engine's in-process device path bit for
    bit (and, on the GPU machine's Pillow, the CPU path's); every bad input gets the CPU path's status and
    message, only its own item fails, and the pipeline (and device) serves the next request."""
    engine = _device_engine(engine_config)
    cpu_engine = EncoderEngine(EngineConfig(**{**engine.cfg.__dict__, "preprocess_device": "cpu"}))
    rng = np.random.default_rng()
    good = [MediaInput(Modality.IMAGE, _jpeg(w, h, seed=int(rng.integers(1 << 30))))
            for w, h in [(321, 123), (64, 64), (500, 200), (90, 300)]]
    good.append(MediaInput(Modality.IMAGE, rng.integers(0, 256, (33, 77, 3), dtype=np.uint8)))  # raw pixels
    good.append(MediaInput(Modality.VIDEO, rng.integers(0, 256, (3, 40, 50, 3), dtype=np.uint8)))  # CPU path
    device = EncodePipeline(engine, PipelineConfig(preprocess_workers=2, arena_mb=64, cache_mb=0))
    cpu = EncodePipeline(cpu_engine, PipelineConfig(preprocess_workers=1, arena_mb=64, cache_mb=0))
    try:
        out = device.encode(good).result(timeout=120)
        assert device.jobs_device_tiled == 5  # the images; the video went the CPU path
        ref = engine.encode(good)
        assert out.token_counts == ref.token_counts
        _same_rows(out.embeddings, ref.embeddings)
        on_cpu = cpu.encode(good).result(timeout=120)
        assert on_cpu.token_counts == out.token_counts
        if PUBLISHED_PASS_ORDER:  # the same pixels
            _same_rows(out.embeddings, on_cpu.embeddings)
        else:
            torch.testing.assert_close(out.embeddings.float(), on_cpu.embeddings.float(), rtol=0.05, atol=0.05)
        refused = set()
        for name, data in _bad_images().items():
            items = [good[0], MediaInput(Modality.IMAGE, data, item_id=name), good[1]]
            theirs, ours = _outcome(lambda: cpu.encode(items)), _outcome(lambda: device.encode(items))
            if isinstance(theirs, tuple):
                assert ours == theirs, name
                refused.add(name)
            else:  # valid after all (CMYK, progressive, palette, 16-bit): the same rows as the in-process path
                _same_rows(ours, engine.encode(items).embeddings)
            after = device.encode(good[:2]).result(timeout=120)
            _same_rows(after.embeddings, ref.embeddings[: sum(ref.token_counts[:2])])
        assert refused == {"truncated", "corrupt", "huge"}
        assert device.arena.wait_idle(5)
    finally:
        device.close()
        cpu.close()


class _TilerFailsOn(DeviceTiler):
    """A real tiler that fails for images of one width (as a device out of memory would for a huge one)."""

    width = 0

    def pieces(self, image, plan):
        if image.shape[1] == self.width:
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().pieces(image, plan)


def test_a_device_tiling_failure_fails_only_its_item(engine_config):
    engine = _device_engine(engine_config)
    engine.device_tiler = _TilerFailsOn(engine.preprocessor.cfg, DEVICE)
    engine.device_tiler.width = 301
    pipeline = EncodePipeline(engine, PipelineConfig(preprocess_workers=1, arena_mb=64, cache_mb=0))
    try:
        failing = [MediaInput(Modality.IMAGE, _jpeg(w, 100, seed=w)) for w in (64, 301, 128)]
        with pytest.raises(Unavailable, match="device tiling failed"):
            pipeline.encode(failing).result(timeout=120)
        fine = [failing[0], failing[2]]
        _same_rows(pipeline.encode(fine).result(timeout=120).embeddings, engine.encode(fine).embeddings)
        assert pipeline.arena.wait_idle(5) and pipeline.store.arenas[OUTPUTS].wait_idle(5)
    finally:
        pipeline.close()


def test_refused_input_is_invalid_input_before_any_device_work(engine_config):
    engine = _device_engine(engine_config)
    with pytest.raises(InvalidInput):
        engine.encode([MediaInput(Modality.IMAGE, b"not an image")])
