"""vLLM's own answers for the cases a test asks about, computed inside the vLLM test environment
(scripts/vllm_env.sh) with vLLM's code: the reference the tests in this package compare against.

    .venv-vllm/bin/python tests/vllm_reference.py CASES.json ANSWERS.json

CASES.json: {"kind": [case, ...], ...}; ANSWERS.json: {"kind": [answer, ...], ...}, in order. Kinds:
  video_repl     {"tokenizer": DIR, "tokens_per_frame": [...], "frames_indices": [...], "fps": F | null,
                  "media_ids": [<img>, </img>, <image>]}
                 -> the token ids of NanoNemotronVLProcessor.get_video_repl (Nemotron Nano VL's video
                    layout), frame_duration_ms = int(1000 / fps) as vLLM's model file computes it
                    (no timestamps when fps is null); with "video": a video_loader case instead of
                    frames_indices and fps, those come from vLLM's loader reading that file
  video_loader   {"path": MP4, "num_frames": N, "fps": F}  (-1: not given)
                 -> {"frames_indices": [...], "fps": ..., "total_num_frames": ...} from vLLM's
                    `nemotron_vl` video loader (the one Nemotron Nano VL's processor uses), OpenCV decoder
  nemotron_rows  {"checkpoint": DIR, "pieces": NPZ (piece0, piece1, ... uint8 [h, w, 3]), "dynamic": [bool],
                  "out": NPZ}  -> rows0, rows1, ... written to "out" by vLLM's own vision modules (fp32)
  video_frame_geometry  {"sizes": [[w, h], ...], "video_target_num_patches": N | null,
                  "video_target_img_size": S | null, "maintain_aspect_ratio": bool, "patch_size": P,
                  "downsample_ratio": R} -> [[target_w, target_h, tokens], ...]
  image_token_counts  {"sizes": [[w, h], ...], "tile_size", "max_tiles", "use_thumbnail", "tokens_per_tile"}
                 -> [[tiles, tokens], ...]; with "dynamic": {"patch_size", "min_num_patches",
                    "max_num_patches"} -> [[patch cols, patch rows, tokens], ...]
"""

from __future__ import annotations

import json
import sys


def video_repl(case: dict) -> list[int]:
    from transformers import PreTrainedTokenizerFast
    from vllm.transformers_utils.processors.nano_nemotron_vl import NanoNemotronVLProcessor

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{case['tokenizer']}/tokenizer.json")
    start, end, context = case["media_ids"]
    if "video" in case:
        loaded = video_loader(case["video"])
        indices, fps = loaded["frames_indices"], loaded["fps"]
    else:
        indices, fps = case["frames_indices"], case["fps"]
    details = NanoNemotronVLProcessor.get_video_repl(
        tokens_per_frame=case["tokens_per_frame"], frames_indices=indices,
        frame_duration_ms=int(1000 / fps) if fps else None, tokenizer=tokenizer,
        img_start_token_ids=[start], img_end_token_ids=[end], img_context_token_ids=[context])
    return list(details.full)


def video_loader(case: dict) -> dict:
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    loader = VIDEO_LOADER_REGISTRY.load("nemotron_vl")
    with open(case["path"], "rb") as f:
        _, metadata = loader.load_bytes(f.read(), num_frames=case["num_frames"], fps=case["fps"])
    return {"frames_indices": [int(i) for i in metadata["frames_indices"]], "fps": float(metadata["fps"]),
            "total_num_frames": int(metadata["total_num_frames"])}


def nemotron_rows(case: dict) -> dict:
    """Embedding rows of uint8 pieces ([h, w, 3] each, the preprocessed tiles / frames / dynamic-resolution
    images) through vLLM's own Nemotron Nano VL vision side, in fp32: its RadioModel with the checkpoint's
    weights loaded by its load_weights, the MTP vision LayerNorm when the config asks for it, its
    pixel_shuffle (dynamic-resolution images through pixel_shuffle_dynamic_res and the packed
    imgs_sizes path), and mlp1 built from its own classes as its model builds it. vLLM's extract_feature
    casts the ViT output to bf16; that cast is left out so fp32 compares with fp32."""
    import tempfile

    import numpy as np
    import torch
    from safetensors import safe_open
    from torch import nn
    from transformers import PretrainedConfig
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.model_executor.layers.activation import ReLUSquaredActivation
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.models.nano_nemotron_vl import NemotronH_Nano_VL_V2

    config = json.loads(open(f"{case['checkpoint']}/config.json").read())
    weights = {}
    index = json.loads(open(f"{case['checkpoint']}/model.safetensors.index.json").read())["weight_map"]
    for shard in sorted(set(index.values())):
        with safe_open(f"{case['checkpoint']}/{shard}", framework="pt") as f:
            weights |= {k: f.get_tensor(k).float() for k in f.keys() if not k.startswith("language_model.")}
    with set_current_vllm_config(VllmConfig()):
        if not model_parallel_is_initialized():
            init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                         distributed_init_method=f"file://{tempfile.mktemp()}")
            initialize_model_parallel(1, 1)
        # The model object without its language model: only the attributes its vision methods read.
        hf = PretrainedConfig(**config)
        hf.vision_config = PretrainedConfig(**config["vision_config"])
        hf.text_config = PretrainedConfig(**config["llm_config"])
        model = NemotronH_Nano_VL_V2.__new__(NemotronH_Nano_VL_V2)
        nn.Module.__init__(model)
        model.patch_size, model.downsample_ratio = config["patch_size"], config["downsample_ratio"]
        model.ps_version = config["ps_version"]
        model.vision_model = model.get_vit_model_from_radio_config(hf).float().eval()
        model.vision_model.load_weights({k.removeprefix("vision_model."): v for k, v in weights.items()
                                         if k.startswith("vision_model.")})
        for module in model.vision_model.modules():  # what vLLM's model loader does after loading
            if hasattr(getattr(module, "quant_method", None), "process_weights_after_loading"):
                module.quant_method.process_weights_after_loading(module)
        width = config["vit_hidden_size"] * int(round(1 / model.downsample_ratio)) ** 2
        mlp1 = nn.Sequential(RMSNorm(hidden_size=width, eps=1e-5),
                             nn.Linear(width, config["projector_hidden_size"], bias=False), ReLUSquaredActivation(),
                             nn.Linear(config["projector_hidden_size"], config["llm_config"]["hidden_size"], bias=False))
        mlp1.load_state_dict({k.removeprefix("mlp1."): v for k, v in weights.items() if k.startswith("mlp1.")})
        norm = None
        if (config["llm_config"].get("num_nextn_predict_layers") or 0) > 0:
            norm = nn.LayerNorm(config["vit_hidden_size"], eps=config["vision_config"].get("layer_norm_eps", 1e-6))
            prefix = "vision_projector.vision_final_layernorm."
            norm.load_state_dict({k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)})
        mean = torch.tensor(config["norm_mean"]).view(3, 1, 1)
        std = torch.tensor(config["norm_std"]).view(3, 1, 1)
        pieces = np.load(case["pieces"])
        out = {}
        with torch.no_grad():
            for i, dynamic in enumerate(case["dynamic"]):
                pixels = (torch.from_numpy(pieces[f"piece{i}"]).permute(2, 0, 1).float() / 255.0 - mean) / std
                h, w = pixels.shape[1:]
                p = model.patch_size
                if dynamic:  # vLLM's packed path: patches flattened (c, y, x), imgs_sizes given
                    flat = pixels.reshape(3, h // p, p, w // p, p).permute(1, 3, 0, 2, 4).reshape(1, -1, 3 * p * p)
                    _, feat = model.vision_model(flat, imgs_sizes=[(h, w)])
                    if norm is not None:
                        feat = norm(feat)
                    feat = model.pixel_shuffle_dynamic_res(feat, imgs_sizes=[(h, w)])
                else:  # tiles and video frames: extract_feature's path
                    _, feat = model.vision_model(pixels[None])
                    if norm is not None:
                        feat = norm(feat)
                    feat = model.pixel_shuffle(feat.reshape(1, h // p, w // p, -1), scale_factor=model.downsample_ratio)
                out[f"rows{i}"] = mlp1(feat.reshape(-1, feat.shape[-1])).numpy()
    np.savez(case["out"], **out)
    return {"out": case["out"]}


def video_frame_geometry(case: dict) -> list:
    """[target width, target height, tokens] of each (width, height) frame from vLLM's
    get_video_target_size_and_feature_size, with the target patch count its processor resolves."""
    import math

    from vllm.transformers_utils.processors.nano_nemotron_vl import get_video_target_size_and_feature_size

    patches = case["video_target_num_patches"]
    if patches is None:
        patches = math.ceil(case["video_target_img_size"] / case["patch_size"]) ** 2
    return [list(get_video_target_size_and_feature_size(
        orig_w=w, orig_h=h, target_patches=patches, maintain_aspect_ratio=case["maintain_aspect_ratio"],
        patch_size=case["patch_size"], downsample_ratio=case["downsample_ratio"])) for w, h in case["sizes"]]


def image_token_counts(case: dict) -> list:
    """Per (width, height): [tiles, tokens] with fixed tiling (InternVL's target grid, as Nemotron's
    processor counts them), or [patch cols, patch rows, tokens] with dynamic resolution (its tiler's
    process_media with the whole max_num_patches budget)."""
    from PIL import Image
    from vllm.transformers_utils.processors.nano_nemotron_vl import (
        DynamicResolutionImageTiler,
        calculate_internvl_targets,
        get_internvl_target_ratios,
    )

    out = []
    if "dynamic" not in case:
        ratios = get_internvl_target_ratios(1, case["max_tiles"])
        for w, h in case["sizes"]:
            tiles, _, _ = calculate_internvl_targets(orig_width=w, orig_height=h, target_ratios=ratios,
                                                     image_size=case["tile_size"], use_thumbnail=case["use_thumbnail"])
            out.append([tiles, tiles * case["tokens_per_tile"]])
        return out
    d = case["dynamic"]
    tiler = DynamicResolutionImageTiler(max_model_len=1 << 20, patch_size=d["patch_size"],
                                        min_num_patches=d["min_num_patches"], max_num_patches=d["max_num_patches"],
                                        downsample_ratio=0.5, norm_mean=[0.5] * 3, norm_std=[0.5] * 3)
    for w, h in case["sizes"]:
        params, _ = tiler.process_media(Image.new("RGB", (w, h)), d["max_num_patches"])
        out.append([*params.patch_size, params.num_embeddings])
    return out


KINDS = {"video_repl": video_repl, "video_loader": video_loader, "nemotron_rows": nemotron_rows,
         "video_frame_geometry": video_frame_geometry, "image_token_counts": image_token_counts}


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    answers = {kind: [KINDS[kind](case) for case in items] for kind, items in cases.items()}
    with open(sys.argv[2], "w") as f:
        json.dump(answers, f)


if __name__ == "__main__":
    main()
