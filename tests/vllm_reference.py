"""vLLM's own answers for the cases a test asks about, computed inside the vLLM test environment
(scripts/vllm_env.sh) with vLLM's code: the reference the tests in this package compare against.

    .venv-vllm/bin/python tests/vllm_reference.py CASES.json ANSWERS.json

CASES.json: {"kind": [case, ...], ...}; ANSWERS.json: {"kind": [answer, ...], ...}, in order. Kinds:
  video_repl     {"tokenizer": DIR, "tokens_per_frame": [...], "frames_indices": [...], "fps": F | null,
                  "media_ids": [<img>, </img>, <image>]}
                 -> the token ids of NanoNemotronVLProcessor.get_video_repl (Nemotron Nano VL's video
                    layout), frame_duration_ms = int(1000 / fps) as vLLM's model file computes it
                    (no timestamps when fps is null)
  video_loader   {"path": MP4, "num_frames": N, "fps": F}  (-1: not given)
                 -> {"frames_indices": [...], "fps": ..., "total_num_frames": ...} from vLLM's
                    `nemotron_vl` video loader (the one Nemotron Nano VL's processor uses), OpenCV decoder
"""

from __future__ import annotations

import json
import sys


def video_repl(case: dict) -> list[int]:
    from transformers import PreTrainedTokenizerFast
    from vllm.transformers_utils.processors.nano_nemotron_vl import NanoNemotronVLProcessor

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{case['tokenizer']}/tokenizer.json")
    start, end, context = case["media_ids"]
    fps = case["fps"]
    details = NanoNemotronVLProcessor.get_video_repl(
        tokens_per_frame=case["tokens_per_frame"], frames_indices=case["frames_indices"],
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


KINDS = {"video_repl": video_repl, "video_loader": video_loader}


def main() -> None:
    cases = json.loads(open(sys.argv[1]).read())
    answers = {kind: [KINDS[kind](case) for case in items] for kind, items in cases.items()}
    with open(sys.argv[2], "w") as f:
        json.dump(answers, f)


if __name__ == "__main__":
    main()
