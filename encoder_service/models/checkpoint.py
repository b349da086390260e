"""Checkpoints are local directories: config.json + *.safetensors (one or many shards).

Two layouts load:
- `model_type: "encoder_service"`: this project's own (ViT + projector + processor settings);
- `model_type: "siglip_vision_model"`: a HF transformers SiglipVisionModel, converted on load.
Nothing is downloaded; the embedded tiny default is generated locally from a fixed seed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from encoder_service.artifacts import build_once, cache_root
from encoder_service.config import (
    EncoderConfig,
    ProcessorConfig,
    TilingSpec,
    VisionConfig,
    tiny_encoder_config,
    with_derived_tokens,
)
from encoder_service.models.encoder import VisionEncoder

WEIGHTS_FILE = "model.safetensors"


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> VisionEncoder:
    path = Path(path)
    raw_config = json.loads((path / "config.json").read_text())
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(shard))

    model_type = raw_config.get("model_type")
    if model_type == "encoder_service":
        cfg = EncoderConfig.from_dict(raw_config)
    elif model_type == "siglip_vision_model":
        cfg = siglip_config(raw_config)
        state = convert_siglip_state_dict(state, cfg.vision)
    else:
        raise ValueError(f"{path}: unsupported model_type {model_type!r}")

    model = VisionEncoder(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint mismatch, missing={missing} unexpected={unexpected}")
    return model.to(device=device, dtype=dtype).eval()


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


def siglip_config(raw: dict) -> EncoderConfig:
    """Map a HF SiglipVisionConfig onto ours: no prefix tokens, no projector, one tile = image_size."""
    image_size, patch = int(raw.get("image_size", 224)), int(raw.get("patch_size", 16))
    vision = VisionConfig(
        hidden_size=raw.get("hidden_size", 768),
        num_layers=raw.get("num_hidden_layers", 12),
        num_heads=raw.get("num_attention_heads", 12),
        intermediate_size=raw.get("intermediate_size", 3072),
        patch_size=patch,
        pos_embed_grid=image_size // patch,
        num_channels=raw.get("num_channels", 3),
        num_cls_tokens=0,
        num_registers=0,
        hidden_act=raw.get("hidden_act", "gelu_pytorch_tanh"),
        layer_norm_eps=raw.get("layer_norm_eps", 1e-6),
        post_layernorm=True,
    )
    tiling = with_derived_tokens(TilingSpec(tile_size=image_size, max_tiles=1, use_thumbnail=False), vision, None)
    processor = ProcessorConfig(tiling=tiling, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    return EncoderConfig(raw.get("_name_or_path") or "siglip-vision", vision, None, processor)


def convert_siglip_state_dict(state: dict[str, torch.Tensor], cfg: VisionConfig) -> dict[str, torch.Tensor]:
    """HF SigLIP names -> ours (q/k/v fused into one qkv projection). The pooling head is dropped."""
    state = {k.removeprefix("vision_model."): v for k, v in state.items() if not k.startswith(("head.", "vision_model.head."))}
    out = {
        "vit.patch_embed.weight": state["embeddings.patch_embedding.weight"],
        "vit.patch_embed.bias": state["embeddings.patch_embedding.bias"],
        "vit.pos_embed": state["embeddings.position_embedding.weight"],
        "vit.prefix_tokens": torch.zeros(0, cfg.hidden_size),
        "vit.post_norm.weight": state["post_layernorm.weight"],
        "vit.post_norm.bias": state["post_layernorm.bias"],
    }
    for i in range(cfg.num_layers):
        src, dst = f"encoder.layers.{i}.", f"vit.blocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.qkv.{kind}"] = torch.cat(
                [state[src + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
            out[dst + f"attn.proj.{kind}"] = state[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"norm1.{kind}"] = state[src + f"layer_norm1.{kind}"]
            out[dst + f"norm2.{kind}"] = state[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.fc1.{kind}"] = state[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.fc2.{kind}"] = state[src + f"mlp.fc2.{kind}"]
    return out
