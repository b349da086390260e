"""A random checkpoint in Nemotron Nano VL's published layout, written the way the model's
repository ships it: config.json with the fields its code reads, the whole VLM's tensors
(vision tower, mlp1 AND a language model) in several safetensors shards plus
`model.safetensors.index.json`.

Key names and shapes follow the model's repository as vLLM / TensorRT-LLM load it
(`vision_model.radio_model.model.patch_generator.*`, `...model.blocks.{i}.*`, `mlp1.{0,1,3}`),
spelled out here rather than taken from the project's loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

VIT = {  # timm name -> (hidden, layers, heads, mlp hidden)
    "vit_small_patch16_224": (384, 12, 6, 1536),
    "vit_tiny_patch16_224": (192, 12, 3, 768),
    "vit_huge_patch16_224": (1280, 32, 16, 5120),
}


def nemotron_config(
    model: str = "vit_tiny_patch16_224",
    tile: int = 64,
    cpe_max_size: int = 512,
    projector_hidden: int = 256,
    llm_hidden: int = 96,
    ps_version: str = "v2",
    dynamic: tuple[int, int] | None = (16, 64),
    teachers: int = 3,
    register_multiple: int = 8,
    mtp: bool = False,
    video: dict | None = None,
) -> dict:
    """`mtp`: a checkpoint trained with MTP (text_config.num_nextn_predict_layers 1, with the vision
    final LayerNorm); `video`: vision_config video options (video_target_num_patches, ...)."""
    args = {
        "model": model,
        "cpe_max_size": cpe_max_size,
        "register_multiple": register_multiple,
        "teachers": [{"name": f"teacher{i}", "use_summary": True} for i in range(teachers)],
        "cls_token_per_teacher": True,
        "model_norm": False,
        "in_chans": None,
        "input_size": None,
        "drop": 0.0,
    }
    if dynamic is not None:
        args["min_num_patches"], args["max_num_patches"] = dynamic
    return {
        "architectures": ["NemotronH_Nano_VL_V2"],
        "model_type": "NemotronH_Nano_VL_V2",
        "auto_map": {"AutoConfig": "configuration.NemotronH_Nano_VL_V2_Config"},
        "force_image_size": tile,
        "patch_size": 16,
        "downsample_ratio": 0.5,
        "ps_version": ps_version,
        "template": "nemotron_h",
        "use_thumbnail": True,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 12,
        "img_context_token_id": 18,
        "img_context_token": "<image>",
        "img_start_token": "<img>",
        "img_end_token": "</img>",
        "vit_hidden_size": VIT[model][0],
        "projector_hidden_size": projector_hidden,
        "norm_mean": [0.48145466, 0.4578275, 0.40821073],
        "norm_std": [0.26862954, 0.26130258, 0.27577711],
        "torch_dtype": "bfloat16",
        "vision_config": {
            "model_type": "radio",
            "args": args,
            "patch_size": 16,
            "max_resolution": cpe_max_size,
            "preferred_resolution": [tile, tile],
            "adaptor_names": None,
            "feature_normalizer_config": None,
            "inter_feature_normalizer_config": None,
            "video_temporal_patch_size": 1,
            "layer_norm_eps": 1e-6,
            **(video or {}),
        },
        "llm_config": {
            "architectures": ["NemotronHForCausalLM"],
            "model_type": "nemotron_h",
            "hidden_size": llm_hidden,
            "num_hidden_layers": 2,
            "vocab_size": 1000,
            "rms_norm_eps": 1e-5,
            "num_nextn_predict_layers": 1 if mtp else 0,
        },
    }


def vision_tensors(config: dict, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    args = config["vision_config"]["args"]
    hidden, layers, _, mlp_hidden = VIT[args["model"]]
    p = config["patch_size"]
    grid = args["cpe_max_size"] // p
    cls = len(args["teachers"]) if args["cls_token_per_teacher"] else 1
    prefix = cls + (args["register_multiple"] - cls % args["register_multiple"])
    width = hidden * int(round(1 / config["downsample_ratio"])) ** 2

    def rand(*shape, scale=0.02, offset=0.0):
        return (offset + scale * torch.randn(shape, generator=generator)).to(dtype)

    tower = "vision_model.radio_model."
    t = {
        tower + "model.patch_generator.embedder.weight": rand(hidden, 3 * p * p),
        tower + "model.patch_generator.pos_embed": rand(1, grid * grid, hidden, scale=0.5),
        tower + "model.patch_generator.cls_token.token": rand(prefix, hidden, scale=0.5),
        tower + "input_conditioner.norm_mean": torch.tensor(config["norm_mean"]).reshape(3, 1, 1),
        tower + "input_conditioner.norm_std": torch.tensor(config["norm_std"]).reshape(3, 1, 1),
        tower + "summary_idxs": torch.arange(cls),
    }
    for i in range(layers):
        b = f"{tower}model.blocks.{i}."
        t |= {
            b + "norm1.weight": rand(hidden, scale=0.1, offset=1.0), b + "norm1.bias": rand(hidden),
            b + "attn.qkv.weight": rand(3 * hidden, hidden, scale=0.06), b + "attn.qkv.bias": rand(3 * hidden),
            b + "attn.proj.weight": rand(hidden, hidden, scale=0.06), b + "attn.proj.bias": rand(hidden),
            b + "norm2.weight": rand(hidden, scale=0.1, offset=1.0), b + "norm2.bias": rand(hidden),
            b + "mlp.fc1.weight": rand(mlp_hidden, hidden, scale=0.06), b + "mlp.fc1.bias": rand(mlp_hidden),
            b + "mlp.fc2.weight": rand(hidden, mlp_hidden, scale=0.03), b + "mlp.fc2.bias": rand(hidden),
        }
    t |= {
        "mlp1.0.weight": rand(width, scale=0.1, offset=1.0),
        "mlp1.1.weight": rand(config["projector_hidden_size"], width, scale=0.03),
        "mlp1.3.weight": rand(config["llm_config"]["hidden_size"], config["projector_hidden_size"], scale=0.03),
    }
    if config["llm_config"]["num_nextn_predict_layers"]:
        t |= {"vision_projector.vision_final_layernorm.weight": rand(hidden, scale=0.2, offset=1.0),
              "vision_projector.vision_final_layernorm.bias": rand(hidden, scale=0.2)}
    return t


def language_model_tensors(config: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    llm = config["llm_config"]
    h = llm["hidden_size"]
    t = {"language_model.backbone.embeddings.weight": torch.randn(llm["vocab_size"], h, generator=generator),
         "language_model.lm_head.weight": torch.randn(llm["vocab_size"], h, generator=generator)}
    for i in range(llm["num_hidden_layers"]):
        t[f"language_model.backbone.layers.{i}.mixer.in_proj.weight"] = torch.randn(4 * h, h, generator=generator)
        t[f"language_model.backbone.layers.{i}.norm.weight"] = torch.ones(h)
    return t


def write_nemotron_checkpoint(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                              vision_shards: int = 2, **config_overrides) -> Path:
    """The VLM in `vision_shards` shards of vision/mlp1 tensors plus one shard of the language model."""
    path.mkdir(parents=True, exist_ok=True)
    config = nemotron_config(**config_overrides)
    gen = torch.Generator().manual_seed(seed)
    vision = vision_tensors(config, gen, dtype)
    keys = list(vision)
    groups = [dict((k, vision[k]) for k in keys[i::vision_shards]) for i in range(vision_shards)]
    groups.append(language_model_tensors(config, gen))
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in group.items()}, str(path / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in group}
        total += sum(v.numel() * v.element_size() for v in group.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def language_model_shard(path: Path) -> Path:
    """The shard that holds only language-model tensors (the last one)."""
    return sorted(path.glob("model-*.safetensors"))[-1]
