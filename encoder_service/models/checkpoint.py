"""Checkpoints are local directories: config.json + *.safetensors (one file, or shards + an index).

A model family (one module each) says which config.json it reads (`matches`), which tensors
it needs (`wanted`), the EncoderConfig they describe (`encoder_config`, from tensor shapes
alone) and how its tensor names map onto ours (`convert_state`):
- `model_type: "encoder_service"`: this project's own layout (ViT + projector + processor);
- `model_type: "siglip_vision_model"`: a HF transformers SiglipVisionModel (`siglip.py`);
- `model_type: "NemotronH_Nano_VL_V2"`: a whole Nemotron Nano VL checkpoint, of which the RADIO
  vision tower and `mlp1` are read (`nemotron.py`);
- `model_type: "internvl"`: a Hugging Face InternVL checkpoint (what vLLM serves as
  `InternVLForConditionalGeneration`), of which InternViT and the projector are read, with the
  tiling of its saved image processor (`internvl.py`).
Tensors are read lazily, one at a time, and only those a family wants: with an index, a
shard holding none of them is never opened. Nothing is downloaded; the embedded tiny default
is generated locally from a fixed seed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from encoder_service.artifacts import build_once, cache_root
from encoder_service.config import EncoderConfig, tiny_encoder_config
from encoder_service.models import internvl, nemotron, siglip
from encoder_service.models.encoder import VisionEncoder

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass(frozen=True)
class Family:
    name: str
    matches: Callable[[dict], bool]
    wanted: Callable[[str], bool]
    encoder_config: Callable[[dict, dict[str, tuple[int, ...]]], EncoderConfig]
    convert_state: Callable[[dict[str, torch.Tensor], EncoderConfig], dict[str, torch.Tensor]]
    # Each tensor family of a checkpoint -> what the loader does with it (read / skipped: why), for `inspect`.
    tensor_families: Callable[[list[str], dict], dict[str, str]] | None = None


def _family(name: str, module: ModuleType) -> Family:
    return Family(name, module.matches, module.wanted, module.encoder_config, module.convert_state,
                  getattr(module, "tensor_families", None))


OWN = Family(
    "encoder_service",
    matches=lambda raw: raw.get("model_type") == "encoder_service",
    wanted=lambda key: True,
    encoder_config=lambda raw, shapes: EncoderConfig.from_dict(raw),
    convert_state=lambda state, cfg: state,
)
FAMILIES = (OWN, _family("siglip", siglip), _family("nemotron-nano-vl", nemotron), _family("internvl", internvl))


def find_family(raw: dict, path: Path) -> Family:
    for family in FAMILIES:
        if family.matches(raw):
            return family
    raise ValueError(f"{path}: unsupported model_type {raw.get('model_type')!r} (supported: encoder_service, "
                     f"siglip_vision_model, NemotronH_Nano_VL_V2, internvl)")


def read_config(path: Path) -> dict:
    """config.json, with the image processor settings saved beside it under `_image_processor`."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (a checkpoint is a local directory with config.json "
                                f"and *.safetensors)")
    raw = json.loads((path / "config.json").read_text())
    raw["_image_processor"] = read_image_processor(path)
    return raw


def read_image_processor(path: Path) -> dict:
    """processor_config.json's `image_processor` (with its `image_seq_length`), or preprocessor_config.json."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (path / name).is_file():
            saved = json.loads((path / name).read_text())
            settings = dict(saved.get("image_processor", saved))
            if "image_seq_length" in saved:
                settings["_image_seq_length"] = saved["image_seq_length"]
            return settings
    return {}


def shard_keys(path: Path, wanted: Callable[[str], bool]) -> dict[Path, list[str]]:
    """Which wanted tensors live in which shard. With an index, from the index alone."""
    index = path / INDEX_FILE
    by_shard: dict[Path, list[str]] = {}
    if index.is_file():
        for key, shard in json.loads(index.read_text())["weight_map"].items():
            if wanted(key):
                by_shard.setdefault(path / shard, []).append(key)
        return by_shard
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{path}: no *.safetensors")
    for shard in shards:
        with safe_open(shard, framework="pt") as f:  # reads the header only
            by_shard[shard] = [k for k in f.keys() if wanted(k)]
    return by_shard


def read_tensors(path: Path, wanted: Callable[[str], bool], meta: bool = False) -> dict[str, torch.Tensor]:
    """The wanted tensors, one by one (memory-mapped reads); `meta`: shapes and dtypes only, no data."""
    state: dict[str, torch.Tensor] = {}
    for shard, keys in shard_keys(path, wanted).items():
        with safe_open(shard, framework="pt") as f:
            for key in keys:
                if meta:
                    s = f.get_slice(key)
                    state[key] = torch.empty(s.get_shape(), dtype=_DTYPES[s.get_dtype()], device="meta")
                else:
                    state[key] = f.get_tensor(key)
    return state


def _build(path: Path, meta: bool) -> tuple[Family, VisionEncoder, dict[str, torch.Tensor]]:
    raw = read_config(path)
    family = find_family(raw, path)
    source = read_tensors(path, family.wanted, meta=meta)
    cfg = family.encoder_config(raw, {k: tuple(v.shape) for k, v in source.items()})
    try:
        state = family.convert_state(source, cfg)
    except KeyError as e:
        raise ValueError(f"{path}: checkpoint mismatch, missing tensor {e}") from None
    with torch.device("meta"):
        model = VisionEncoder(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: {list(state[k].shape)} vs {list(expected[k].shape)}" for k in set(state) & set(expected)
             if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: checkpoint mismatch, missing={missing[:8]} unexpected={unexpected[:8]} "
                         f"wrong shapes={wrong[:8]}")
    return family, model, state


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> VisionEncoder:
    _, model, state = _build(Path(path), meta=False)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval()


def checkpoint_config(path: str | os.PathLike) -> EncoderConfig:
    """The EncoderConfig a checkpoint directory describes, from its config.json and tensor headers alone."""
    return _build(Path(path), meta=True)[1].cfg


def inspect_checkpoint(path: str | os.PathLike) -> dict:
    """What a checkpoint directory holds and how it would be served, from headers alone (no weights read)."""
    path = Path(path)
    family, model, state = _build(path, meta=True)
    cfg, v = model.cfg, model.cfg.vision
    proc = cfg.processor
    raw = read_config(path)
    keys = [k for shard_keys_ in shard_keys(path, lambda k: True).values() for k in shard_keys_]
    info = {
        "path": str(path),
        "family": family.name,
        "model_type": raw.get("model_type"),
        "name": cfg.name,
        "vision": {"hidden": v.hidden_size, "layers": v.num_layers, "heads": v.num_heads, "head_dim": v.head_dim,
                   "mlp": v.intermediate_size, "patch": v.patch_size, "prefix_tokens": v.num_prefix_tokens,
                   "position_table": f"{v.pos_embed_grid}x{v.pos_embed_grid} ({v.pos_embed_mode})",
                   "final_norm": v.post_layernorm},
        "projector": None if cfg.projector is None else {
            "kind": cfg.projector.kind, "pixel_shuffle": f"{cfg.projector.downsample}x{cfg.projector.downsample} "
            f"{cfg.projector.ps_version}", "hidden": cfg.projector.hidden_size,
            "vision_norm": cfg.projector.vision_norm_eps is not None},
        "output_size": cfg.output_size,
        "tiling": {"tile_size": proc.tiling.tile_size, "tiles": f"{proc.tiling.min_tiles}..{proc.tiling.max_tiles}",
                   "thumbnail": proc.tiling.use_thumbnail, "tokens_per_tile": proc.tiling.tokens_per_tile},
        "dynamic_resolution": None if proc.dynamic is None else {
            "patches": f"{proc.dynamic.min_num_patches}..{proc.dynamic.max_num_patches}",
            "max_tokens_per_image": proc.dynamic.max_num_patches // proc.dynamic.downsample**2},
        "video_frames": None if proc.video_frames is None else {
            "target_num_patches": proc.video_frames.target_num_patches,
            "maintain_aspect_ratio": proc.video_frames.maintain_aspect_ratio},
        "tensor_families": family.tensor_families(keys, raw) if family.tensor_families else None,
        "parameters": sum(t.numel() for t in state.values()),
        "checkpoint_dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in state.values()}),
    }
    return info


def save_checkpoint(model: VisionEncoder, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE))
    (path / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2))
    return path


def random_encoder(cfg: EncoderConfig, seed: int = 0) -> VisionEncoder:
    """Random weights with the scale of a trained ViT (so activations stay O(1))."""
    gen = torch.Generator().manual_seed(seed)
    model = VisionEncoder(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model.eval()


def tiny_checkpoint_dir(root: str | os.PathLike | None = None) -> Path:
    """The embedded default encoder checkpoint (deterministic: every replica builds the same weights)."""
    cfg = tiny_encoder_config()
    return build_once(cache_root(root) / cfg.name, lambda tmp: save_checkpoint(random_encoder(cfg, seed=1234), tmp))
