"""EVS on a real video file: tokens kept, encoder time, LLM prefill time and time to first token per rate.

A real H.264 MP4 is made here (PyAV): a static textured background with a bright square moving
across it, `--frames` frames sampled out of it. The encoder is the real gRPC server (tiny ViT at
Nemotron's geometry: 512 px frames, 256 tokens per frame; its output width is the tiny LLM's),
the LLM the reference engine; one process. For each pruning rate q, interleaved, median of the
repeats:
- `encoder_ms`: one Encode of the video (decode, ViT, EVS, transfer);
- `prefill_ms`: the LLM request with the video already cached (layout, re-layout, prefill, first token);
- `ttft_ms`: the same request end to end on a fresh cache (Encode + prefill + first token).

    python -m bench.video_evs [--frames 16 --rates 0,0.5,0.75,0.9 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import device_name, preset_checkpoint
from encoder_service.client.endpoint import EncoderClient
from encoder_service.config import EngineConfig
from encoder_service.contract.media import MediaInput, Modality, VideoSampling
from encoder_service.contract.tokens import retained_token_count
from encoder_service.serving.api.server import BackgroundServer, ServerConfig
from llm_worker.engine import GenerationRequest, LLMEngine, LLMWorkerConfig
from llm_worker.tiny import tiny_llm_dir, tiny_tokenizer_dir
from tests.video_fixture import mp4_bytes


def moving_square_clip(frames: int, size: int = 512, seed: int = 0) -> bytes:
    """A static background with a 96-px square crossing it: most of each frame never changes."""
    rng = np.random.default_rng(seed)
    background = np.repeat(np.repeat(rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8), 16, 0), 16, 1)
    out = np.repeat(background[None], frames, axis=0)
    for f in range(frames):
        x = (f * (size - 96)) // max(1, frames - 1)
        out[f, 200:296, x : x + 96] = 255
    return mp4_bytes(out, fps=8)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--rates", default="0,0.5,0.75,0.9")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk-size", type=int, default=1024)
    args = p.parse_args()
    rates = [float(q) for q in args.rates.split(",")]

    workdir = Path(tempfile.mkdtemp(prefix="bench-evs-"))
    engine_cfg = EngineConfig(checkpoint=str(preset_checkpoint("tiny-512", workdir)))
    llm_cfg = LLMWorkerConfig(model_dir=str(tiny_llm_dir(workdir)), tokenizer_dir=str(tiny_tokenizer_dir(workdir)),
                              chunk_size=args.chunk_size, step_token_budget=args.chunk_size)
    clip = moving_square_clip(args.frames)
    sampling = VideoSampling(num_frames=args.frames)
    items = {q: MediaInput(Modality.VIDEO, clip, sampling=sampling, pruning_rate=q) for q in rates}
    prompt = "What moves in this clip? <video> Answer briefly."

    with BackgroundServer(ServerConfig(port=0, engine=engine_cfg)) as server, EncoderClient(server.address) as client:
        client.wait_ready()
        warm = LLMEngine(llm_cfg, client)
        times: dict[float, dict[str, list[float]]] = {q: {"encoder": [], "prefill": [], "ttft": []} for q in rates}
        kept: dict[float, list[int]] = {}
        prompt_tokens: dict[float, int] = {}
        for repeat in range(args.repeats + 1):  # the first round warms everything up
            for q in rates:
                t0 = time.perf_counter()
                result = client.encode([items[q]])
                encoder_s = time.perf_counter() - t0
                kept[q] = result.items[0].tokens_per_frame

                fresh = LLMEngine(llm_cfg, client)
                t0 = time.perf_counter()
                out = fresh.generate([GenerationRequest(prompt, [items[q]], max_new_tokens=1)])[0]
                ttft_s = time.perf_counter() - t0

                warm.generate([GenerationRequest(prompt, [items[q]], max_new_tokens=1)])  # cached from now on
                calls = server.counters.encode_calls
                t0 = time.perf_counter()
                warm.generate([GenerationRequest(prompt, [items[q]], max_new_tokens=1)])
                prefill_s = time.perf_counter() - t0
                assert server.counters.encode_calls == calls, "the cached run must not encode"
                if repeat:
                    times[q]["encoder"].append(encoder_s)
                    times[q]["ttft"].append(ttft_s)
                    times[q]["prefill"].append(prefill_s)
                prompt_tokens[q] = out.prompt_tokens

        print(json.dumps({"bench": "video_evs", "device": device_name(torch.device("cpu")), "frames": args.frames,
                          "tokens_per_frame": 256, "chunk_size": args.chunk_size}), flush=True)
        for q in rates:
            total = sum(kept[q])
            assert total == retained_token_count(256, args.frames, q)
            med = {k: 1e3 * statistics.median(v) for k, v in times[q].items()}
            print(json.dumps({
                "q": q, "tokens_kept": total, "tokens_per_frame_kept": kept[q],
                "prompt_tokens": prompt_tokens[q],
                "encoder_ms": round(med["encoder"], 1), "prefill_ms": round(med["prefill"], 1),
                "ttft_ms": round(med["ttft"], 1),
            }), flush=True)


if __name__ == "__main__":
    main()
