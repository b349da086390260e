"""A Hugging Face transformers `SiglipVisionModel` checkpoint (`model_type: siglip_vision_model`).

No prefix tokens and no projector; one tile is the model's `image_size`; q/k/v are fused into
one projection on load and the pooling head is dropped.
"""

from __future__ import annotations

import torch

from encoder_service.config import EncoderConfig, ProcessorConfig, VisionConfig, with_derived_tokens
from encoder_service.contract.tokens import TilingSpec


def matches(raw: dict) -> bool:
    return raw.get("model_type") == "siglip_vision_model"


def wanted(key: str) -> bool:
    return not key.startswith(("head.", "vision_model.head."))


def encoder_config(raw: dict, shapes: dict[str, tuple[int, ...]]) -> EncoderConfig:
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


def convert_state(state: dict[str, torch.Tensor], cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """HF SigLIP names -> ours."""
    state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    out = {
        "vit.patch_embed.weight": state["embeddings.patch_embedding.weight"],
        "vit.patch_embed.bias": state["embeddings.patch_embedding.bias"],
        "vit.pos_embed": state["embeddings.position_embedding.weight"],
        "vit.prefix_tokens": state["embeddings.position_embedding.weight"].new_zeros(0, cfg.vision.hidden_size),
        "vit.post_norm.weight": state["post_layernorm.weight"],
        "vit.post_norm.bias": state["post_layernorm.bias"],
    }
    for i in range(cfg.vision.num_layers):
        src, dst = f"encoder.layers.{i}.", f"vit.blocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.qkv.{kind}"] = torch.cat([state[src + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
            out[dst + f"attn.proj.{kind}"] = state[src + f"self_attn.out_proj.{kind}"]
            out[dst + f"norm1.{kind}"] = state[src + f"layer_norm1.{kind}"]
            out[dst + f"norm2.{kind}"] = state[src + f"layer_norm2.{kind}"]
            out[dst + f"mlp.fc1.{kind}"] = state[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.fc2.{kind}"] = state[src + f"mlp.fc2.{kind}"]
    return out
