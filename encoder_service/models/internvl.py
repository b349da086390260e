"""InternVL checkpoints in the Hugging Face format (`model_type: "internvl"`,
`InternVLForConditionalGeneration`): InternViT + pixel shuffle + an MLP projector, Nemotron Nano VL's
lineage. vLLM serves this format (`InternS1ForConditionalGeneration`), so one checkpoint directory
can feed both vLLM and this pool. Only `vision_tower.*` and `multi_modal_projector.*` are read:

  vision_tower.embeddings.cls_token                        [1, 1, D]
  vision_tower.embeddings.patch_embeddings.projection.{weight,bias}   Conv2d(3, D, p, p)
  vision_tower.embeddings.position_embeddings              [1, 1 + G*G, D]  (CLS entry first)
  vision_tower.encoder.layer.{i}.layernorm_before / attention.{q,k,v}_proj / attention.projection_layer
      / lambda_1 / layernorm_after / mlp.fc1 / mlp.fc2 / lambda_2          (pre-norm blocks, layer scale)
  vision_tower.layernorm                                   only without mean pooling
  multi_modal_projector.{layer_norm,linear_1,linear_2}     LayerNorm -> Linear -> GELU -> Linear

The last layer's patch tokens (CLS dropped) go through InternVL's pixel shuffle (v2 order) and the
projector. Tiling and normalisation come from the checkpoint's image processor config
(`GotOcr2ImageProcessor`: `crop_to_patches` tiles + thumbnail, the same grid choice as Nemotron's),
resampled as its backend does: torchvision's antialiased bicubic on uint8 (Hugging Face's default,
which vLLM uses; measured equal to its pixel values), PIL's for `GotOcr2ImageProcessorPil`.
Refused, never ignored: q/k norms, RMS-norm blocks, another feature layer or selection, a resampling
filter other than bicubic.
"""

from __future__ import annotations

import math

import torch

from encoder_service.config import EncoderConfig, ProcessorConfig, ProjectorConfig, VisionConfig, with_derived_tokens
from encoder_service.contract.tokens import TilingSpec

TOWER = "vision_tower."
PROJECTOR = "multi_modal_projector."
EMBED = TOWER + "embeddings."
LAYERS = TOWER + "encoder.layer."
BICUBIC = 3  # PIL's resampling code, as image processor configs store it
# Per block: ours <- theirs (q/k/v are fused into one qkv below).
BLOCK_MAP = {
    "norm1": "layernorm_before", "attn.proj": "attention.projection_layer", "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}


def matches(raw: dict) -> bool:
    return raw.get("model_type") == "internvl"


def wanted(key: str) -> bool:
    return key.startswith((TOWER, PROJECTOR))


def _refuse_unless(condition: bool, what: str) -> None:
    if not condition:
        raise ValueError(f"InternVL checkpoint: {what} is not supported by this encoder")


def _side(value) -> int:
    """image_size / patch_size as config.json stores them: an int, or [h, w] (square only)."""
    if isinstance(value, (list, tuple)):
        _refuse_unless(value[0] == value[1], f"a non-square size {list(value)}")
        return int(value[0])
    return int(value)


def encoder_config(raw: dict, shapes: dict[str, tuple[int, ...]]) -> EncoderConfig:
    v, text = raw.get("vision_config") or {}, raw.get("text_config") or {}
    _refuse_unless(not v.get("use_qk_norm", False), "use_qk_norm (q/k RMS norms)")
    _refuse_unless(v.get("norm_type", "layer_norm") == "layer_norm", f"norm_type {v.get('norm_type')!r}")
    _refuse_unless(v.get("use_absolute_position_embeddings", True), "a vision tower without position embeddings")
    _refuse_unless(raw.get("vision_feature_layer", -1) == -1, f"vision_feature_layer {raw.get('vision_feature_layer')}")
    _refuse_unless(raw.get("vision_feature_select_strategy", "default") == "default",
                   f"vision_feature_select_strategy {raw.get('vision_feature_select_strategy')!r}")
    _refuse_unless(raw.get("projector_hidden_act", "gelu") == "gelu", f"projector_hidden_act {raw.get('projector_hidden_act')!r}")
    hidden, patch = int(v["hidden_size"]), _side(v["patch_size"])
    image = _side(v["image_size"])
    table = shapes.get(EMBED + "position_embeddings")
    grid = math.isqrt((table[1] if table else 1) - 1)
    _refuse_unless(table is not None and grid * grid + 1 == table[1] and grid * patch == image,
                   f"a position table of shape {list(table) if table else None} for {image} px at patch {patch}")
    vision = VisionConfig(
        hidden_size=hidden, num_layers=int(v["num_hidden_layers"]), num_heads=int(v["num_attention_heads"]),
        intermediate_size=int(v["intermediate_size"]), patch_size=patch, pos_embed_grid=grid, num_cls_tokens=1,
        num_registers=0, hidden_act=v.get("hidden_act", "gelu"), layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
        post_layernorm=not v.get("use_mean_pooling", True), patch_bias=True, pos_embed_mode="resample",
        layer_scale=True,
    )
    ratio = float(raw.get("downsample_ratio", 0.5))
    downsample = round(1 / ratio)
    _refuse_unless(abs(downsample * ratio - 1) < 1e-6, f"downsample_ratio {ratio} (not 1/n)")
    llm_hidden = int(text["hidden_size"])
    projector = ProjectorConfig(downsample=downsample, hidden_size=llm_hidden, output_size=llm_hidden,
                                layer_norm_eps=1e-5, kind="layernorm_gelu", ps_version="v2")
    return EncoderConfig(raw.get("_name_or_path") or "internvl", vision, projector,
                         _processor(raw.get("_image_processor") or {}, image, vision, projector))


def _processor(ip: dict, tile: int, vision: VisionConfig, projector: ProjectorConfig) -> ProcessorConfig:
    """The checkpoint's image processor settings (GotOcr2ImageProcessor) as our tiling."""
    size = ip.get("size") or {"height": tile, "width": tile}
    side = _side([size.get("height", tile), size.get("width", tile)])
    _refuse_unless(side == tile, f"an image processor size {side} other than the tower's {tile}")
    _refuse_unless(int(ip.get("resample", BICUBIC)) == BICUBIC, f"resample filter {ip.get('resample')}")
    crop = bool(ip.get("crop_to_patches", True))
    max_tiles = int(ip.get("max_patches", 12)) if crop else 1
    tiling = with_derived_tokens(TilingSpec(tile_size=tile, min_tiles=int(ip.get("min_patches", 1)) if crop else 1,
                                            max_tiles=max_tiles, use_thumbnail=crop), vision, projector)
    seq = ip.get("_image_seq_length")
    _refuse_unless(seq is None or int(seq) == tiling.tokens_per_tile,
                   f"image_seq_length {seq} while the geometry gives {tiling.tokens_per_tile} per tile")
    pil = str(ip.get("image_processor_type", "")).endswith("Pil")
    return ProcessorConfig(tiling=tiling, image_mean=tuple(ip.get("image_mean", (0.485, 0.456, 0.406))),
                           image_std=tuple(ip.get("image_std", (0.229, 0.224, 0.225))),
                           resize="pil" if pil else "torch-aa")


def convert_state(state: dict[str, torch.Tensor], cfg: EncoderConfig) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ours; the CLS token takes its position embedding with it (a constant)."""
    v = cfg.vision
    table = state[EMBED + "position_embeddings"].reshape(-1, v.hidden_size)
    out = {
        "vit.patch_embed.weight": state[EMBED + "patch_embeddings.projection.weight"],
        "vit.patch_embed.bias": state[EMBED + "patch_embeddings.projection.bias"],
        "vit.pos_embed": table[1:],
        "vit.prefix_tokens": state[EMBED + "cls_token"].reshape(1, v.hidden_size) + table[:1],
        "projector.norm.weight": state[PROJECTOR + "layer_norm.weight"],
        "projector.norm.bias": state[PROJECTOR + "layer_norm.bias"],
        "projector.fc1.weight": state[PROJECTOR + "linear_1.weight"],
        "projector.fc1.bias": state[PROJECTOR + "linear_1.bias"],
        "projector.fc2.weight": state[PROJECTOR + "linear_2.weight"],
        "projector.fc2.bias": state[PROJECTOR + "linear_2.bias"],
    }
    used = {EMBED + s for s in ("position_embeddings", "cls_token", "patch_embeddings.projection.weight",
                                "patch_embeddings.projection.bias")}
    used |= {PROJECTOR + f"{m}.{k}" for m in ("layer_norm", "linear_1", "linear_2") for k in ("weight", "bias")}
    for i in range(v.num_layers):
        theirs = f"{LAYERS}{i}."
        for ours, name in BLOCK_MAP.items():
            for kind in ("weight", "bias"):
                out[f"vit.blocks.{i}.{ours}.{kind}"] = state[f"{theirs}{name}.{kind}"]
                used.add(f"{theirs}{name}.{kind}")
        qkv = [f"{theirs}attention.{n}_proj" for n in "qkv"]
        out[f"vit.blocks.{i}.attn.qkv.weight"] = torch.cat([state[n + ".weight"] for n in qkv])
        out[f"vit.blocks.{i}.attn.qkv.bias"] = torch.cat(
            [state.get(n + ".bias", torch.zeros(v.hidden_size, dtype=state[n + ".weight"].dtype)) for n in qkv])
        out[f"vit.blocks.{i}.ls1"] = state[f"{theirs}lambda_1"]
        out[f"vit.blocks.{i}.ls2"] = state[f"{theirs}lambda_2"]
        used |= {n + s for n in qkv for s in (".weight", ".bias")} | {f"{theirs}lambda_1", f"{theirs}lambda_2"}
    if v.post_layernorm:
        for kind in ("weight", "bias"):
            out[f"vit.post_norm.{kind}"] = state[f"{TOWER}layernorm.{kind}"]
            used.add(f"{TOWER}layernorm.{kind}")
    unknown = sorted(k for k in state if k not in used)
    if unknown:
        raise ValueError(f"tensors this loader cannot apply (unsupported InternVL variant?): {unknown[:8]}")
    return out
