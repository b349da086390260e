"""Nemotron Nano VL: its published checkpoint layout loads, and the embeddings equal an independent
float64 reference written from the published definitions (RADIO's patch generator with CPE,
timm-style pre-norm blocks, InternVL's pixel shuffle v1/v2, mlp1); dynamic resolution
follows the published algorithm and mixes with tiled media in one batch."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from encoder_service.config import EngineConfig
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.contract.tokens import DynamicResolution, count_dynamic_tokens, dynamic_patch_grid
from encoder_service.engine import EncoderEngine
from encoder_service.models import load_checkpoint
from encoder_service.models.checkpoint import inspect_checkpoint, read_tensors
from tests.conftest import image_bytes
from tests.nemotron_fixture import language_model_shard, write_nemotron_checkpoint


@pytest.fixture(scope="module")
def nemotron_dir(tmp_path_factory):
    path = write_nemotron_checkpoint(tmp_path_factory.mktemp("nemotron") / "vlm", seed=11)
    # The language model's shard is garbage from here on: loading works only if it is never opened.
    shard = language_model_shard(path)
    shard.write_bytes(b"\0not a safetensors file" * 100)
    return path


@pytest.fixture(scope="module")
def nemotron_engine(nemotron_dir):
    return EncoderEngine(EngineConfig(checkpoint=str(nemotron_dir), max_tokens_per_batch=2048))


# ---------------------------------------------------------------- the reference (float64, no project code)


def reference_embeddings(tensors: dict[str, torch.Tensor], config: dict, pixels: np.ndarray) -> torch.Tensor:
    """uint8 [h, w, 3] (the processor's output for one piece) -> [tokens, llm_hidden], in float64."""
    d = {k: v.double() for k, v in tensors.items()}
    tower, p = "vision_model.radio_model.model.", config["patch_size"]
    h, w = pixels.shape[:2]
    gh, gw = h // p, w // p
    mean = torch.tensor(config["norm_mean"], dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(config["norm_std"], dtype=torch.float64).view(3, 1, 1)
    x = (torch.from_numpy(pixels).double().permute(2, 0, 1) / 255.0 - mean) / std
    # RADIO Im2Patches: "c (py yy) (px xx) -> (py px) (c yy xx)", then the bias-free Linear embedder.
    patches = x.reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3 * p * p)
    emb = patches @ d[tower + "patch_generator.embedder.weight"].T
    # CPE: the table, bilinearly resized (align_corners=False) to a max(gh, gw) square, top-left window.
    table = d[tower + "patch_generator.pos_embed"]
    side = math.isqrt(table.shape[1])
    table = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(max(gh, gw),) * 2, mode="bilinear", align_corners=False)[:, :, :gh, :gw]
    emb = emb + table.flatten(2)[0].T
    prefix = d[tower + "patch_generator.cls_token.token"]
    seq = torch.cat([prefix, emb])[None]
    # timm pre-norm blocks, via torch's own TransformerEncoderLayer(norm_first=True).
    hidden = emb.shape[1]
    heads = {192: 3, 1280: 16}[hidden]
    i = 0
    while f"{tower}blocks.{i}.norm1.weight" in d:
        b = f"{tower}blocks.{i}."
        layer = torch.nn.TransformerEncoderLayer(hidden, heads, d[b + "mlp.fc1.weight"].shape[0], dropout=0.0,
                                                 activation="gelu", layer_norm_eps=1e-6, batch_first=True,
                                                 norm_first=True, dtype=torch.float64)
        layer.load_state_dict({
            "self_attn.in_proj_weight": d[b + "attn.qkv.weight"], "self_attn.in_proj_bias": d[b + "attn.qkv.bias"],
            "self_attn.out_proj.weight": d[b + "attn.proj.weight"], "self_attn.out_proj.bias": d[b + "attn.proj.bias"],
            "linear1.weight": d[b + "mlp.fc1.weight"], "linear1.bias": d[b + "mlp.fc1.bias"],
            "linear2.weight": d[b + "mlp.fc2.weight"], "linear2.bias": d[b + "mlp.fc2.bias"],
            "norm1.weight": d[b + "norm1.weight"], "norm1.bias": d[b + "norm1.bias"],
            "norm2.weight": d[b + "norm2.weight"], "norm2.bias": d[b + "norm2.bias"],
        })
        seq = layer.eval()(seq)
        i += 1
    feat = seq[0, prefix.shape[0]:].reshape(1, gh, gw, hidden)
    if config["llm_config"].get("num_nextn_predict_layers"):  # MTP checkpoints: LayerNorm before the shuffle
        norm = "vision_projector.vision_final_layernorm."
        feat = F.layer_norm(feat, (hidden,), d[norm + "weight"], d[norm + "bias"],
                            config["vision_config"].get("layer_norm_eps", 1e-6))
    # InternVL/Nemotron pixel_shuffle, step by step as published (n, w, h, c naming kept).
    n, ww, hh, c = feat.shape
    s = config["downsample_ratio"]
    y = feat.reshape(n, ww, int(hh * s), int(c / s)).permute(0, 2, 1, 3)
    y = y.reshape(n, int(hh * s), int(ww * s), int(c / (s * s)))
    if config["ps_version"] != "v1":
        y = y.permute(0, 2, 1, 3)
    y = y.reshape(-1, y.shape[-1])
    # mlp1: RMSNorm (eps 1e-5, as the model's code builds it) -> Linear -> squared ReLU -> Linear, no biases.
    eps = 1e-5
    y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + eps) * d["mlp1.0.weight"]
    y = torch.relu(y @ d["mlp1.1.weight"].T) ** 2
    return y @ d["mlp1.3.weight"].T


def _vision_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for shard in sorted(path.glob("model-*.safetensors"))[:-1]:  # every shard but the language model's
        out |= load_file(shard)
    return out


def _assert_matches_reference(engine, path, items):
    config = json.loads((path / "config.json").read_text())
    tensors = _vision_tensors(path)
    out = engine.encode(items)
    for item, rows in zip(items, out.split()):
        processed = engine.preprocessor.process(item)
        expected = torch.cat([reference_embeddings(tensors, config, piece) for piece in processed.pieces()])
        assert rows.shape == expected.shape
        torch.testing.assert_close(rows.double(), expected, rtol=2e-4, atol=2e-4)
    return out


# ---------------------------------------------------------------- loading


def test_loads_only_the_vision_tower_and_mlp1(nemotron_dir):
    tensors = read_tensors(nemotron_dir, lambda k: k.startswith(("vision_model.radio_model.", "mlp1.")))
    assert tensors and not any(k.startswith("language_model") for k in tensors)
    model = load_checkpoint(nemotron_dir)  # the language model's shard is garbage: never opened
    cfg = model.cfg
    assert (cfg.vision.hidden_size, cfg.vision.num_layers, cfg.vision.num_heads) == (192, 12, 3)
    assert cfg.vision.num_prefix_tokens == 8  # 3 teachers' CLS + 5 registers (register_multiple 8)
    assert cfg.vision.pos_embed_grid == 32 and cfg.vision.pos_embed_mode == "cpe" and not cfg.vision.patch_bias
    assert (cfg.projector.kind, cfg.projector.ps_version, cfg.output_size) == ("mlp1", "v2", 96)
    assert cfg.processor.dynamic == DynamicResolution(16, 2, 16, 64)
    assert cfg.processor.tiling.tokens_per_tile == 4


def test_inspect_reports_geometry_without_reading_weights(nemotron_dir, capsys):
    from encoder_service.cli import main

    info = inspect_checkpoint(nemotron_dir)
    assert info["family"] == "nemotron-nano-vl" and info["model_type"] == "NemotronH_Nano_VL_V2"
    assert info["dynamic_resolution"] == {"patches": "16..64", "max_tokens_per_image": 16}
    assert info["parameters"] == sum(p.numel() for p in load_checkpoint(nemotron_dir).parameters())
    assert main(["inspect", "--checkpoint", str(nemotron_dir)]) == 0
    out = capsys.readouterr().out
    assert "nemotron-nano-vl" in out and "dynamic resolution" in out


def test_unservable_directories_fail_clearly(tmp_path, capsys):
    from encoder_service.cli import main

    path = write_nemotron_checkpoint(tmp_path / "lscale", dynamic=None)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    from safetensors.torch import save_file
    save_file({"vision_model.radio_model.model.blocks.0.ls1.gamma": torch.ones(192)}, str(path / "extra.safetensors"))
    index["weight_map"]["vision_model.radio_model.model.blocks.0.ls1.gamma"] = "extra.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="cannot apply.*ls1.gamma"):
        load_checkpoint(path)

    config = json.loads((path / "config.json").read_text())
    config["vision_config"]["args"]["model"] = "vit_giant_patch14_224"
    (path / "config.json").write_text(json.dumps(config))
    assert main(["inspect", "--checkpoint", str(path)]) == 2
    assert "not a supported RADIO backbone" in capsys.readouterr().err
    assert main(["inspect", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "no config.json" in capsys.readouterr().err


# ---------------------------------------------------------------- numerics


def test_tiled_images_and_video_match_the_reference(tmp_path):
    path = write_nemotron_checkpoint(tmp_path / "tiled", seed=3, dynamic=None)
    engine = EncoderEngine(EngineConfig(checkpoint=str(path), device="cpu", max_tokens_per_batch=64))  # forces splitting
    rng = np.random.default_rng(0)
    items = [
        MediaInput(Modality.IMAGE, image_bytes(150, 70, seed=1)),  # 2x1 tiles + thumbnail
        MediaInput(Modality.VIDEO, rng.integers(0, 256, (3, 40, 60, 3), dtype=np.uint8)),
        MediaInput(Modality.IMAGE, image_bytes(64, 64, seed=2)),
    ]
    out = _assert_matches_reference(engine, path, items)
    assert out.token_counts == [3 * 4, 3 * 4, 4]


@pytest.mark.parametrize("ps_version", ["v1", "v2"])
def test_dynamic_resolution_mixed_with_video_matches_the_reference(tmp_path, ps_version):
    path = write_nemotron_checkpoint(tmp_path / ps_version, seed=5, ps_version=ps_version, dynamic=(16, 160))
    engine = EncoderEngine(EngineConfig(checkpoint=str(path), device="cpu", max_tokens_per_batch=256))
    rng = np.random.default_rng(1)
    sizes = [(300, 120), (90, 200), (33, 17), (640, 480)]  # wide, tall, tiny (raised to min), large (capped)
    items = [MediaInput(Modality.IMAGE, image_bytes(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]
    items.insert(2, MediaInput(Modality.VIDEO, rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)))
    out = _assert_matches_reference(engine, path, items)
    spec = engine.preprocessor.cfg.dynamic
    expected = [count_dynamic_tokens(w, h, spec) for w, h in sizes]
    assert out.token_counts[:2] + out.token_counts[3:] == expected
    assert out.items[2].tokens_per_frame == [4, 4]


def test_served_model_info_lets_an_llm_worker_count_dynamic_tokens(nemotron_dir):
    """GetModelInfo over real gRPC carries the dynamic-resolution spec; the counts it gives match."""
    from encoder_service.client.endpoint import EncoderClient
    from encoder_service.contract.plan import MediaPlanner
    from encoder_service.serving.api.server import BackgroundServer, ServerConfig

    engine_cfg = EngineConfig(checkpoint=str(nemotron_dir), max_tokens_per_batch=2048)
    with BackgroundServer(ServerConfig(port=0, engine=engine_cfg)) as server, EncoderClient(server.address) as client:
        info = client.model_info()
        assert info.dynamic == DynamicResolution(16, 2, 16, 64)
        counter = MediaPlanner.for_model(info)
        sizes = [(200, 100), (17, 300), (48, 48)]
        items = [MediaInput(Modality.IMAGE, image_bytes(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]
        result = client.encode(items)
        assert result.token_counts == [counter.plan(item).tokens for item in items]
        assert result.embeddings.shape == (sum(result.token_counts), 96)


# ---------------------------------------------------------------- variants: MTP norm, video geometry, refusals


def test_mtp_checkpoint_applies_the_vision_norm_and_inspect_says_so(tmp_path, capsys):
    from encoder_service.cli import main

    path = write_nemotron_checkpoint(tmp_path / "mtp", seed=7, dynamic=(16, 96), mtp=True)
    engine = EncoderEngine(EngineConfig(checkpoint=str(path), device="cpu", max_tokens_per_batch=512))
    rng = np.random.default_rng()
    items = [MediaInput(Modality.IMAGE, image_bytes(120, 70, seed=int(rng.integers(1 << 30)))),
             MediaInput(Modality.VIDEO, rng.integers(0, 256, (2, 50, 40, 3), dtype=np.uint8))]
    out = _assert_matches_reference(engine, path, items)
    # The same tensors without the MTP field: vLLM does not apply the norm, nor do we (rows differ).
    config = json.loads((path / "config.json").read_text())
    config["llm_config"]["num_nextn_predict_layers"] = 0
    (path / "config.json").write_text(json.dumps(config))
    plain = EncoderEngine(EngineConfig(checkpoint=str(path), device="cpu", max_tokens_per_batch=512)).encode(items)
    assert (out.embeddings - plain.embeddings).norm() > 0.05 * out.embeddings.norm()
    config["llm_config"]["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(config))
    assert main(["inspect", "--checkpoint", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "vision LayerNorm before the shuffle" in printed
    assert "vision_projector.vision_final_layernorm: read (MTP vision norm)" in printed
    assert "language_model: skipped: language model" in printed


@pytest.mark.parametrize("video", [
    {"video_target_num_patches": 36},  # square: floor(sqrt(36)) = 6 patches a side
    {"video_target_num_patches": 40, "video_maintain_aspect_ratio": True},
    {"video_target_img_size": 72, "video_maintain_aspect_ratio": True},  # ceil(72 / 16)^2 = 25 patches
])
def test_video_frames_follow_the_checkpoints_geometry(tmp_path, video):
    from encoder_service.contract.tokens import count_frame_tokens, video_frame_size

    path = write_nemotron_checkpoint(tmp_path / "video", seed=9, dynamic=None, video=video)
    engine = EncoderEngine(EngineConfig(checkpoint=str(path), device="cpu", max_tokens_per_batch=512))
    geometry = engine.info().video_frames
    from encoder_service.contract.wire.model_info import model_info_from_proto, model_info_to_proto
    assert model_info_from_proto(model_info_to_proto(engine.info())).video_frames == geometry  # GetModelInfo carries it
    patches = video.get("video_target_num_patches") or math.ceil(video["video_target_img_size"] / 16) ** 2
    assert geometry.target_num_patches == patches
    assert geometry.maintain_aspect_ratio == video.get("video_maintain_aspect_ratio", False)
    rng = np.random.default_rng()
    items = [MediaInput(Modality.VIDEO, rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8)) for w, h in
             [(160, 90), (40, 120), (64, 64)]]
    items.insert(1, MediaInput(Modality.IMAGE, image_bytes(150, 70, seed=int(rng.integers(1 << 30)))))
    out = _assert_matches_reference(engine, path, items)
    for item, frames in zip(items, [i.tokens_per_frame for i in out.items]):
        if item.modality == Modality.VIDEO:
            size = video_frame_size(item.data.shape[2], item.data.shape[1], engine.tiling, geometry)
            assert engine.planner.plan(item).sizes == (size,) * 3
            assert frames == [count_frame_tokens(size, 16, 2)] * 3
            h, w = size
            assert h % 32 == 0 and w % 32 == 0 and (h // 16) * (w // 16) <= patches
            if not geometry.maintain_aspect_ratio:
                assert h == w == 6 * 16 if patches == 36 else h == w
    # EVS works on such frames: K rows kept over the video, the first frame whole.
    pruned = engine.encode([MediaInput(Modality.VIDEO, items[0].data, pruning_rate=0.5)])
    assert pruned.items[0].tokens_per_frame[0] == out.items[0].tokens_per_frame[0]
    assert sum(pruned.items[0].tokens_per_frame) == pruned.token_counts[0] < out.token_counts[0]


def test_variants_this_loader_does_not_implement_are_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    def with_extra(name: str, tensors: dict[str, torch.Tensor], **overrides):
        path = write_nemotron_checkpoint(tmp_path / name, dynamic=None, **overrides)
        index = json.loads((path / "model.safetensors.index.json").read_text())
        save_file(tensors, str(path / "extra.safetensors"))
        index["weight_map"] |= {k: "extra.safetensors" for k in tensors}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
        return path

    for key in ("vision_projector.other_norm.weight", "vision_model.siglip.embed.weight",
                "vision_model.radio_model.model.blocks.0.attn.q_norm.weight", "mlp1.2.weight"):
        with pytest.raises(ValueError, match="vision-side tensors this loader cannot apply") as refused:
            load_checkpoint(with_extra(key.replace(".", "_"), {key: torch.ones(4)}))
        assert key in str(refused.value)
    # Families skipped on purpose load, and say so.
    path = with_extra("skipped", {"sound_encoder.conv.weight": torch.ones(4),
                                  "vision_model.radio_model.adaptors.clip.mlp.weight": torch.ones(4)})
    load_checkpoint(path)
    families = inspect_checkpoint(path)["tensor_families"]
    assert families["sound"].startswith("skipped: audio")
    assert families["vision_model.radio_model.adaptors"].startswith("skipped: teacher adaptors")
    # MTP without its norm; video options that are unknown or contradictory.
    with pytest.raises(ValueError, match="num_nextn_predict_layers.*no vision_projector.vision_final_layernorm"):
        load_checkpoint(_mtp_without_norm(tmp_path))
    for video, message in [({"video_target_num_patches": 64, "video_target_img_size": 128}, "both"),
                           ({"video_frame_stride": 2}, "video_frame_stride")]:
        with pytest.raises(ValueError, match=message):
            load_checkpoint(write_nemotron_checkpoint(tmp_path / message, dynamic=None, video=video))


def _mtp_without_norm(tmp_path):
    path = write_nemotron_checkpoint(tmp_path / "mtp-no-norm", dynamic=None)
    config = json.loads((path / "config.json").read_text())
    config["llm_config"]["num_nextn_predict_layers"] = 2
    (path / "config.json").write_text(json.dumps(config))
    return path


# ---------------------------------------------------------------- the dynamic-resolution algorithm


NEMOTRON_SPEC = DynamicResolution(patch_size=16, downsample=2, min_num_patches=1024, max_num_patches=13312)


@pytest.mark.parametrize("size, grid", [
    ((1920, 1080), (68, 120)),  # 67.5 and 120.5 round half to even: 68 and 120; within budget, kept
    ((4000, 3000), (100, 132)),  # scaled by sqrt(13312/47000): 100 x 133; 100 x 134 > budget, so 132
    ((100, 50), (26, 44)),  # 4 x 7 patches raised to >= 1024: 25 x 43, then rounded up to even
    ((16, 16), (32, 32)),  # 2 x 2 (16/16 + .5 rounds to 2) raised: 32 x 32
])
def test_dynamic_grid_worked_examples(size, grid):
    assert dynamic_patch_grid(*size, NEMOTRON_SPEC) == grid


def test_dynamic_grid_properties():
    rng = random.Random(0)
    for _ in range(2000):
        w, h = rng.randint(1, 9000), rng.randint(1, 9000)
        rows, cols = dynamic_patch_grid(w, h, NEMOTRON_SPEC)
        assert rows % 2 == 0 and cols % 2 == 0 and rows >= 2 and cols >= 2
        assert rows * cols <= NEMOTRON_SPEC.max_num_patches + 2 * (rows + cols)
        assert count_dynamic_tokens(w, h, NEMOTRON_SPEC) == rows * cols // 4
        if min(w, h) >= 256:  # aspect ratio kept (to the rounding of a side of >= 16 patches)
            assert abs(math.log((cols / rows) / (w / h))) < 0.2
    # A 1-pixel strip scaled below one patch across (where the published code divides by zero).
    assert dynamic_patch_grid(1, 300_000, NEMOTRON_SPEC) == (15798, 2)


def test_served_videos_with_a_frame_geometry_equal_the_engine(tmp_path):
    """Through the real gRPC server (preprocessing workers, shared arenas): an MP4 and raw frames resized
    to the checkpoint's aspect-preserving frame geometry give the engine's rows, bit for bit."""
    from encoder_service.client.endpoint import EncoderClient
    from encoder_service.contract.media import VideoSampling
    from encoder_service.serving.api.server import BackgroundServer, ServerConfig
    pytest.importorskip("av")
    from tests.video_fixture import mp4_bytes

    path = write_nemotron_checkpoint(tmp_path / "served", seed=13, dynamic=None,
                                     video={"video_target_num_patches": 40, "video_maintain_aspect_ratio": True})
    rng = np.random.default_rng()
    frames = rng.integers(0, 256, (6, 48, 96, 3), dtype=np.uint8)
    items = [MediaInput(Modality.VIDEO, mp4_bytes(frames), sampling=VideoSampling(num_frames=3)),
             MediaInput(Modality.VIDEO, frames[:2]),
             MediaInput(Modality.VIDEO, mp4_bytes(frames), sampling=VideoSampling(num_frames=4), pruning_rate=0.5)]
    cfg = EngineConfig(checkpoint=str(path), max_tokens_per_batch=512)
    expected = EncoderEngine(cfg).encode(items)
    with BackgroundServer(ServerConfig(port=0, engine=cfg)) as server, EncoderClient(server.address) as client:
        result = client.encode(items)
    torch.testing.assert_close(result.embeddings, expected.embeddings, rtol=0, atol=0)
    assert [i.tokens_per_frame for i in result.items] == [i.tokens_per_frame for i in expected.items]
    assert result.items[0].frame_indices == [0, 2, 5] and result.items[0].video_fps == 10.0
    assert expected.items[0].tokens_per_frame == [10] * 3  # 48x96 at 40 patches: 4 x 10 patches -> 2 x 5 tokens
