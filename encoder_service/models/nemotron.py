"""Nemotron Nano VL checkpoints as published: the RADIO vision tower and the `mlp1` projector.

A Nemotron Nano VL directory holds the whole VLM (config.json with `model_type`
"NemotronH_Nano_VL_V2", sharded safetensors + index). Only the vision side is read
(`vision_model.*`, `vision_projector.*`, `mlp1.*`); the language model's tensors are never loaded.
Every tensor family of the checkpoint is accounted for (`FAMILIES`, `tensor_families`): read, or
skipped on purpose (language model, audio encoder, teacher adaptors, summary heads, the input
normaliser), and any other vision-side tensor refuses the checkpoint. Layout, as the model's own
code and vLLM (`radio.py`, `nano_nemotron_vl.py`) / TensorRT-LLM (`modeling_radio.py`,
`modeling_nemotron_nano.py`) read it:

  radio_model.model.patch_generator.embedder.weight   [D, 3*p*p]  flattened patches -> D, no bias
  radio_model.model.patch_generator.pos_embed         [1, G*G, D] G = cpe_max_size / p (CPE table)
  radio_model.model.patch_generator.cls_token.token   [K, D]      class + register tokens
  radio_model.model.blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}
  radio_model.model.norm.{weight,bias}                 only used when args.model_norm
  mlp1.0.weight (RMSNorm, eps 1e-5 as vLLM builds it), mlp1.1.weight, mlp1.3.weight (Linear, no
      bias; squared ReLU between)
  vision_projector.vision_final_layernorm.{weight,bias}  checkpoints trained with MTP
      (`text_config.num_nextn_predict_layers` > 0): a LayerNorm (eps `vision_config.layer_norm_eps`,
      default 1e-6) over the ViT's features, prefix tokens dropped, before the pixel shuffle

Geometry comes from config.json: `vision_config.args.model` (a timm ViT name), `patch_size`,
`force_image_size`, `downsample_ratio`, `ps_version`, `vit_hidden_size`,
`projector_hidden_size`, `llm_config.hidden_size` / `rms_norm_eps`, `norm_mean`/`norm_std`,
`min/max_dynamic_patch` + `use_thumbnail` (fixed tiling) and `min_num_patches` /
`max_num_patches` (dynamic resolution, when present); video frames from `vision_config`'s
`video_target_num_patches` or `video_target_img_size` (at most one) and
`video_maintain_aspect_ratio`, else one square tile per frame. Any other `video_*` option of
`vision_config` refuses the checkpoint.
"""

from __future__ import annotations

import math

import torch

from encoder_service.config import (
    CLIP_MEAN,
    CLIP_STD,
    EncoderConfig,
    ProcessorConfig,
    ProjectorConfig,
    VisionConfig,
    with_derived_tokens,
)
from encoder_service.contract.tokens import DynamicResolution, TilingSpec, VideoFrameGeometry

MODEL_TYPE_PREFIX = "nemotronh_nano_vl"
TOWER = "vision_model.radio_model."
PATCH_GEN = TOWER + "model.patch_generator."
BLOCKS = TOWER + "model.blocks."
FINAL_NORM = TOWER + "model.norm."
VISION_NORM = "vision_projector.vision_final_layernorm."
VIDEO_OPTIONS = ("video_temporal_patch_size", "video_target_num_patches", "video_target_img_size",
                 "video_maintain_aspect_ratio")
MLP1_RMS_EPS = 1e-5  # vLLM (and the model's own code) build mlp1's RMSNorm with it, whatever the LLM's eps

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
# Tensor families of a Nemotron Nano VL checkpoint this loader skips on purpose, and why (the README
# lists them). Vision-side ones are prefixes of the tower; the others are whole top-level families.
SKIPPED_VISION = {
    TOWER + "input_conditioner.": "input normaliser (the preprocessing normalises with norm_mean/std)",
    TOWER + "summary_idxs": "summary heads (the VLM uses patch features)",
    TOWER + "adaptors.": "teacher adaptors (distillation heads)",
    TOWER + "feature_normalizer.": "teacher feature normaliser",
    TOWER + "inter_feature_normalizer.": "teacher feature normaliser",
    TOWER + "model.head.": "summary heads (the VLM uses patch features)",
    TOWER + "model.fc_norm.": "summary heads (the VLM uses patch features)",
    TOWER + "model.patch_generator.video_embedder.": "tubelet video embedder (video_temporal_patch_size 1 only)",
}
SKIPPED_OTHER = {
    "language_model.": "language model",
    "sound": "audio encoder and its projection",
}
VISION_SIDE = ("vision_model.", "vision_projector.", "mlp1.")
IGNORED = tuple(SKIPPED_VISION)


def matches(raw: dict) -> bool:
    return str(raw.get("model_type", "")).lower().startswith(MODEL_TYPE_PREFIX)


def wanted(key: str) -> bool:
    """Every vision-side tensor (headers suffice to refuse unknown ones; they are read as the model is)."""
    return key.startswith(VISION_SIDE)


def family_of(key: str) -> str:
    """A tensor's family, as `inspect` lists them: blocks collapse to one entry."""
    if key.startswith(BLOCKS):
        return BLOCKS + "*"
    for prefix in (*SKIPPED_VISION, *SKIPPED_OTHER, VISION_NORM, PATCH_GEN, FINAL_NORM, "mlp1."):
        if key.startswith(prefix):
            return prefix.rstrip(".")
    return ".".join(key.split(".")[:2])


def tensor_families(keys, raw: dict) -> dict[str, str]:
    """Each tensor family of a checkpoint (from its index or headers) and what this loader does with it."""
    mtp = _mtp(raw)
    out: dict[str, str] = {}
    for key in keys:
        family = family_of(key)
        if family in out:
            continue
        skipped = next((why for p, why in (*SKIPPED_VISION.items(), *SKIPPED_OTHER.items()) if key.startswith(p)), None)
        if skipped:
            out[family] = f"skipped: {skipped}"
        elif key.startswith(VISION_NORM):
            out[family] = "read (MTP vision norm)" if mtp else "skipped: num_nextn_predict_layers is 0 (as vLLM)"
        elif key.startswith(FINAL_NORM) and not (raw.get("vision_config", {}).get("args") or {}).get("model_norm"):
            out[family] = "skipped: args.model_norm is off"
        elif key.startswith(VISION_SIDE):
            out[family] = "read"
        else:
            out[family] = "skipped: not part of the vision side"
    return out


def _mtp(raw: dict) -> bool:
    llm = raw.get("llm_config") or raw.get("text_config") or {}
    return int(llm.get("num_nextn_predict_layers") or 0) > 0


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
    unknown_video = sorted(k for k in vision_cfg if k.startswith("video_") and k not in VIDEO_OPTIONS)
    if unknown_video:
        raise ValueError(f"vision_config has video options this loader does not implement: {unknown_video} "
                         f"(implemented: {', '.join(VIDEO_OPTIONS)})")
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
        layer_norm_eps=MLP1_RMS_EPS,
        kind="mlp1",
        ps_version=_require(raw, "ps_version"),
        vision_norm_eps=float(vision_cfg.get("layer_norm_eps", 1e-6)) if _mtp(raw) else None,
    )
    if projector.vision_norm_eps is not None and VISION_NORM + "weight" not in shapes:
        raise ValueError(f"text_config.num_nextn_predict_layers > 0 (a checkpoint trained with MTP) but the "
                         f"checkpoint has no {VISION_NORM}weight")
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
        video_frames=_video_frames(vision_cfg, int(raw.get("patch_size") or patch), downsample),
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


def _video_frames(vision_cfg: dict, patch: int, downsample: int) -> VideoFrameGeometry | None:
    """vLLM's processor: exactly one of video_target_num_patches / video_target_img_size (the latter as
    ceil(size / patch)^2 patches, with the top-level patch_size), else None (one square tile per frame)."""
    patches, size = vision_cfg.get("video_target_num_patches"), vision_cfg.get("video_target_img_size")
    if patches is not None and size is not None:
        raise ValueError("vision_config sets both video_target_num_patches and video_target_img_size (exactly one "
                         "may be set)")
    if size is not None:
        patches = math.ceil(size / patch) ** 2
    if patches is None:
        return None
    return VideoFrameGeometry(int(patches), bool(vision_cfg.get("video_maintain_aspect_ratio", False)), patch,
                              downsample)


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
    mtp = cfg.projector.vision_norm_eps is not None
    if mtp:
        for kind in ("weight", "bias"):
            out[f"projector.vision_norm.{kind}"] = state[VISION_NORM + kind]
            used.add(VISION_NORM + kind)
    unknown = sorted(k for k in state if k not in used and not k.startswith(IGNORED)
                     and not (k.startswith(FINAL_NORM) and not v.post_layernorm)
                     and not (k.startswith(VISION_NORM) and not mtp))
    if unknown:
        families = sorted({family_of(k) for k in unknown})
        raise ValueError(f"vision-side tensors this loader cannot apply (unsupported variant; families "
                         f"{families}): {unknown[:8]}")
    return out
