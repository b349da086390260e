"""Nemotron Nano VL checkpoints as published: the RADIO vision tower and the `mlp1` projector.

A Nemotron Nano VL directory holds the whole VLM (config.json with `model_type`
"NemotronH_Nano_VL_V2", sharded safetensors + index). Only `vision_model.radio_model.*` and
`mlp1.*` are read; the language model's tensors are never loaded. Layout, as the model's own
code and vLLM (`radio.py`, `nano_nemotron_vl.py`) / TensorRT-LLM (`modeling_radio.py`,
`modeling_nemotron_nano.py`) read it:

  radio_model.model.patch_generator.embedder.weight   [D, 3*p*p]  flattened patches -> D, no bias
  radio_model.model.patch_generator.pos_embed         [1, G*G, D] G = cpe_max_size / p (CPE table)
  radio_model.model.patch_generator.cls_token.token   [K, D]      class + register tokens
  radio_model.model.blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}
  radio_model.model.norm.{weight,bias}                 only used when args.model_norm
  mlp1.0.weight (RMSNorm), mlp1.1.weight, mlp1.3.weight (Linear, no bias; squared ReLU between)

Geometry comes from config.json: `vision_config.args.model` (a timm ViT name), `patch_size`,
`force_image_size`, `downsample_ratio`, `ps_version`, `vit_hidden_size`,
`projector_hidden_size`, `llm_config.hidden_size` / `rms_norm_eps`, `norm_mean`/`norm_std`,
`min/max_dynamic_patch` + `use_thumbnail` (fixed tiling) and `min_num_patches` /
`max_num_patches` (dynamic resolution, when present).
"""

from __future__ import annotations

import math

import torch

from encoder_service.config import (
    CLIP_MEAN,
    CLIP_STD,
    DynamicResolution,
    EncoderConfig,
    ProcessorConfig,
    ProjectorConfig,
    TilingSpec,
    VisionConfig,
    with_derived_tokens,
)

MODEL_TYPE_PREFIX = "nemotronh_nano_vl"
TOWER = "vision_model.radio_model."
PATCH_GEN = TOWER + "model.patch_generator."
BLOCKS = TOWER + "model.blocks."
FINAL_NORM = TOWER + "model.norm."

# timm ViT names RADIO is built on: (hidden, layers, heads, mlp hidden).
TIMM_VIT_DIMS = {
    "vit_tiny_patch16_224": (192, 12, 3, 768),
    "vit_small_patch16_224": (384, 12, 6, 1536),
    "vit_base_patch16_224": (768, 12, 12, 3072),
    "vit_large_patch16_224": (1024, 24, 16, 4096),
    "vit_huge_patch16_224": (1280, 32, 16, 5120),
}
BLOCK_TENSORS = tuple(
    f"{layer}.{kind}" for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
    for kind in ("weight", "bias")
)
# Vision-tower tensors that do not take part in the embeddings a VLM consumes.
IGNORED = tuple(TOWER + p for p in (
    "input_conditioner.", "summary_idxs", "adaptors.", "feature_normalizer.", "inter_feature_normalizer.",
    "model.head.", "model.fc_norm.", "model.patch_generator.video_embedder.",
))


def matches(raw: dict) -> bool:
    return str(raw.get("model_type", "")).lower().startswith(MODEL_TYPE_PREFIX)


def wanted(key: str) -> bool:
    return key.startswith((TOWER, "mlp1."))


def _require(raw: dict, key: str, where: str = "config.json"):
    if key not in raw:
        raise ValueError(f"{where} lacks {key!r}, which a Nemotron Nano VL checkpoint must have")
    return raw[key]


def encoder_config(raw: dict, shapes: dict[str, tuple[int, ...]]) -> EncoderConfig:
    vision_cfg = _require(raw, "vision_config")
    args = vision_cfg.get("args") or {}
    name = args.get("model")
    if name not in TIMM_VIT_DIMS:
        raise ValueError(f"vision_config.args.model {name!r} is not a supported RADIO backbone "
                         f"(supported: {', '.join(TIMM_VIT_DIMS)})")
    hidden, layers, heads, mlp_hidden = TIMM_VIT_DIMS[name]
    if raw.get("vit_hidden_size", hidden) != hidden:
        raise ValueError(f"vit_hidden_size {raw['vit_hidden_size']} does not match {name} ({hidden})")
    if vision_cfg.get("video_temporal_patch_size", 1) != 1:
        raise ValueError("video_temporal_patch_size > 1 (tubelet video embedding) is not supported")
    patch = int(vision_cfg.get("patch_size") or _require(raw, "patch_size"))

    embedder = _shape(shapes, PATCH_GEN + "embedder.weight")
    if embedder != (hidden, 3 * patch * patch):
        raise ValueError(f"patch embedder is {list(embedder)}, expected {[hidden, 3 * patch * patch]} for {name}/{patch}")
    table = _shape(shapes, PATCH_GEN + "pos_embed")
    side = math.isqrt(table[-2])
    if side * side != table[-2]:
        raise ValueError(f"position table of {table[-2]} entries is not square")
    prefix = _shape(shapes, PATCH_GEN + "cls_token.token")[0]
    final_norm = bool(args.get("model_norm", False))
    if final_norm and FINAL_NORM + "weight" not in shapes:
        raise ValueError("args.model_norm is set but the checkpoint has no final norm (model.norm)")
    if any(k.startswith(PATCH_GEN + "embedder.bias") for k in shapes):
        raise ValueError("a patch embedder with a bias is not a RADIO layout this loader knows")

    vision = VisionConfig(
        hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=mlp_hidden,
        patch_size=patch, pos_embed_grid=side, num_cls_tokens=prefix, num_registers=0,
        hidden_act="gelu", layer_norm_eps=1e-6, post_layernorm=final_norm, patch_bias=False, pos_embed_mode="cpe",
    )
    ratio = float(_require(raw, "downsample_ratio"))
    downsample = round(1 / ratio)
    if abs(downsample * ratio - 1) > 1e-6:
        raise ValueError(f"downsample_ratio {ratio} is not 1/n")
    llm = raw.get("llm_config") or raw.get("text_config") or {}
    projector = ProjectorConfig(
        downsample=downsample,
        hidden_size=int(_require(raw, "projector_hidden_size")),
        output_size=int(_require(llm, "hidden_size", "config.json's llm_config")),
        layer_norm_eps=float(llm.get("rms_norm_eps", 1e-5)),
        kind="mlp1",
        ps_version=_require(raw, "ps_version"),
    )
    tiling = TilingSpec(
        tile_size=int(_require(raw, "force_image_size")),
        min_tiles=int(raw.get("min_dynamic_patch", 1)),
        max_tiles=int(raw.get("max_dynamic_patch", 12)),
        use_thumbnail=bool(raw.get("use_thumbnail", True)),
    )
    processor = ProcessorConfig(
        tiling=with_derived_tokens(tiling, vision, projector),
        image_mean=tuple(raw.get("norm_mean", CLIP_MEAN)),
        image_std=tuple(raw.get("norm_std", CLIP_STD)),
        dynamic=_dynamic_resolution(vision_cfg, args, patch, downsample, side),
    )
    return EncoderConfig(raw.get("_name_or_path") or "nemotron-nano-vl", vision, projector, processor)


def _dynamic_resolution(vision_cfg: dict, args: dict, patch: int, downsample: int, side: int) -> DynamicResolution | None:
    """Dynamic resolution is on when the config names `min_num_patches` (as vLLM decides it).

    A `max_num_patches` of 0 means "no cap" in vLLM, where the LLM's context then bounds it; a
    token count that is a function of the image alone needs a finite cap: the position table's
    own size (cpe_max_size / patch)^2.
    """
    source = args if "min_num_patches" in args else vision_cfg
    if "min_num_patches" not in source:
        return None
    cap = int(source.get("max_num_patches", 0)) or side * side
    return DynamicResolution(patch, downsample, int(source["min_num_patches"]), cap)


def _shape(shapes: dict[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"checkpoint has no {key}: not a Nemotron Nano VL vision tower")
    return tuple(shapes[key])


def convert_state(state: dict[str, torch.Tensor], cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours. A tensor of the tower that would change the embeddings but has no
    place here (layer scale, q/k norms, ...) is an error, never silently skipped."""
    v, p = cfg.vision, cfg.vision.patch_size
    out = {
        "vit.patch_embed.weight": state[PATCH_GEN + "embedder.weight"].reshape(v.hidden_size, 3, p, p),
        "vit.pos_embed": state[PATCH_GEN + "pos_embed"].reshape(-1, v.hidden_size),
        "vit.prefix_tokens": state[PATCH_GEN + "cls_token.token"],
        "projector.norm.weight": state["mlp1.0.weight"],
        "projector.fc1.weight": state["mlp1.1.weight"],
        "projector.fc2.weight": state["mlp1.3.weight"],
    }
    used = {PATCH_GEN + s for s in ("embedder.weight", "pos_embed", "cls_token.token")}
    used |= {"mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight"}
    for i in range(v.num_layers):
        for name in BLOCK_TENSORS:
            out[f"vit.blocks.{i}.{name}"] = state[f"{BLOCKS}{i}.{name}"]
            used.add(f"{BLOCKS}{i}.{name}")
    if v.post_layernorm:
        for kind in ("weight", "bias"):
            out[f"vit.post_norm.{kind}"] = state[FINAL_NORM + kind]
            used.add(FINAL_NORM + kind)
    unknown = sorted(k for k in state if k not in used and not k.startswith(IGNORED)
                     and not (k.startswith(FINAL_NORM) and not v.post_layernorm))
    if unknown:
        raise ValueError(f"tensors this loader cannot apply (unsupported RADIO variant?): {unknown[:8]}")
    return out
