"""EncodeStream and progressive prefill, side by side with unary Encode then prefill.

(a) Idle latency, one request at a time (the servers' caches off, so every call encodes): a 1-image
    request (each image of the serving mix in turn) and an 8-image one, unary vs streamed, per path:
    the engine's own `encode` (in-process: the denominator), the standalone gRPC server (its own
    process), Serve's gRPC proxy and the Serve handle. For streams also the time to the first
    item's rows. Both read answers in place (`copy=False`), and each row gives the server's own time
    for the call (`*_pipeline_ms`, from the answer's extras): the rest is hops, framing and transfer.
    `--chunk-mb` compares stream message sizes on the gRPC path, `--connections` one stream spread
    over several TCP connections (`EncoderClient(connections=N)`; "" for none).
(b) TTFT: the reference LLM engine (a random Llama as wide as the encoder's rows, `--llm-layers`
    layers, on the same device) fed by the standalone gRPC server: prompts with 1, 4 and 8 images
    and a 16-frame video; unary-then-prefill (progressive_prefill off) vs streamed + progressive.
    TTFT is the time to the first generated token; "first chunk" the time to the first prefill chunk.

    python -m bench.progressive_prefill                                     # CPU: tiny, fp32
    python -m bench.progressive_prefill --preset radio-h --device cuda --preprocess-workers 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import IMAGE_MIXES, device_name, jpeg_mix, preset_checkpoint
from bench.served_throughput import APP, as_items, serve_pool, standalone_server
from encoder_service.config import EngineConfig
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.engine import EncoderEngine


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def requests_for_latency() -> dict[str, list[list[MediaInput]]]:
    singles = [as_items([data]) for data in jpeg_mix(len(IMAGE_MIXES["serving"]), seed=7)]
    return {"1-image": singles, "8-image": [as_items(jpeg_mix(8, seed=11))]}


def pipeline_ms(result) -> float:
    """The server's own time for the call (its pipeline: admission of the request to its last row), from
    the answer's extras; what the client saw beyond it is hops, framing and transfer."""
    parts = result.extras.get("parts") or [result.extras]
    return max(part.get("total_ms", float("nan")) for part in parts)


def latency_row(path: str, kind: str, unary, stream, requests, repeats: int) -> dict:
    """Medians over the requests of `kind` (each request timed `repeats` times), unary and streamed in turn."""
    unary_ms, stream_ms, first_ms, inside = [], [], [], {"unary": [], "stream": []}
    for items in requests:
        u, s, f, pu, ps = [], [], [], [], []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            pu.append(pipeline_ms(unary(items)))
            u.append(time.perf_counter() - t0)
            first = []
            t0 = time.perf_counter()
            ps.append(pipeline_ms(stream(items, lambda *event: first.append(time.perf_counter()) if not first else None)))
            s.append(time.perf_counter() - t0)
            f.append(first[0] - t0)
        unary_ms.append(1e3 * statistics.median(u[1:]))
        stream_ms.append(1e3 * statistics.median(s[1:]))
        first_ms.append(1e3 * statistics.median(f[1:]))
        inside["unary"].append(statistics.median(pu[1:]))
        inside["stream"].append(statistics.median(ps[1:]))
    row = {"latency": path, "request": kind, "unary_ms": round(statistics.mean(unary_ms), 1),
           "stream_ms": round(statistics.mean(stream_ms), 1), "stream_first_item_ms": round(statistics.mean(first_ms), 1),
           "stream_vs_unary": round(statistics.mean(stream_ms) / statistics.mean(unary_ms), 3),
           "unary_pipeline_ms": round(statistics.mean(inside["unary"]), 1),
           "stream_pipeline_ms": round(statistics.mean(inside["stream"]), 1)}
    if len(requests) > 1:  # per request (the mix's sizes in turn): small and large answers apart
        row["per_request_unary_ms"] = [round(ms, 1) for ms in unary_ms]
        row["per_request_stream_ms"] = [round(ms, 1) for ms in stream_ms]
    return row


def engine_latency(engine: EncoderEngine, requests, repeats: int) -> dict[str, list[float]]:
    """Per kind: each request's median ms."""
    return {kind: [1e3 * statistics.median(timed(lambda items=items: engine.encode(items), repeats)) for items in reqs]
            for kind, reqs in requests.items()}


# ------------------------------------------------------------------ (b) TTFT


def random_llm_dir(root: Path, hidden: int, layers: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_worker.tokenizer import ByteTokenizer

    path = root / f"llm-{hidden}x{layers}"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        heads = max(1, hidden // 128)
        cfg = LlamaConfig(vocab_size=ByteTokenizer.VOCAB_SIZE, hidden_size=hidden, intermediate_size=3 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                          max_position_embeddings=1 << 17, bos_token_id=ByteTokenizer.BOS,
                          eos_token_id=ByteTokenizer.EOS)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return str(path)


def ttft_prompts(seed: int = 3) -> dict[str, tuple[str, list[MediaInput]]]:
    rng = np.random.default_rng(seed)
    images = as_items(jpeg_mix(8, seed=seed))
    frames = rng.integers(0, 256, (16, 360, 640, 3), dtype=np.uint8)
    from tests.video_fixture import av, mp4_bytes

    # An MP4 where PyAV is installed; the decoded frames themselves elsewhere (the GPU machine).
    video = MediaInput(Modality.VIDEO, mp4_bytes(frames, fps=8) if av is not None else frames)
    return {
        "1-image": ("Describe <image> briefly.", images[:1]),
        "4-image": ("Compare " + ", ".join(["<image>"] * 4) + ".", images[:4]),
        "8-image": ("Compare " + ", ".join(["<image>"] * 8) + ".", images),
        "16-frame video": ("What happens in <video>?", [video]),
    }


class TimedEngine:
    """The reference LLM engine, noting when each generation's first prefill chunk ran."""

    def __init__(self, client, llm_dir: str, device: str, progressive: bool, chunk: int):
        from llm_worker.engine import LLMEngine, LLMWorkerConfig

        cfg = LLMWorkerConfig(model_dir=llm_dir, device=device, chunk_size=chunk, step_token_budget=chunk,
                              progressive_prefill=progressive, cache_bytes=0,  # every run encodes
                              dtype="bfloat16" if device == "cuda" else "float32")
        self.engine, self.device = LLMEngine(cfg, client), device
        self.first_chunk: float | None = None
        original = self.engine._prefill_chunk

        def prefill_chunk(seq, n):
            if self.first_chunk is None:
                self.first_chunk = time.perf_counter()
            original(seq, n)

        self.engine._prefill_chunk = prefill_chunk

    def ttft(self, prompt: str, media) -> tuple[float, float]:
        """(time to the first generated token, time to the first prefill chunk), seconds."""
        from llm_worker.engine import GenerationRequest

        self.first_chunk = None
        t0 = time.perf_counter()
        self.engine.generate([GenerationRequest(prompt, media, max_new_tokens=1)])
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, self.first_chunk - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny-5120")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--preprocess-workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--paths", default="grpc,serve-grpc,serve-handle")
    p.add_argument("--chunk-mb", default="16", help="stream message sizes to compare on the gRPC path")
    p.add_argument("--connections", default="4,8", help="8-image streams spread over this many connections")
    p.add_argument("--ttft-connections", type=int, default=1, help="connections of the LLM worker's client")
    p.add_argument("--llm-layers", type=int, default=4)
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--skip-ttft", action="store_true")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    from encoder_service.client.endpoint import EncoderClient

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-"))
    checkpoint = str(preset_checkpoint(args.preset, workdir))
    print(json.dumps({"bench": "progressive_prefill", "device": device_name(torch.device(args.device)),
                      "preset": args.preset, "cpus": os.cpu_count(), "preprocess_workers": args.preprocess_workers}),
          flush=True)
    requests = requests_for_latency()
    engine = EncoderEngine(EngineConfig(checkpoint=checkpoint, device=args.device, dtype=args.dtype,
                                        max_tokens_per_request=1 << 30, preprocess_threads=args.preprocess_workers))
    per_request = engine_latency(engine, requests, args.repeats)
    base = {kind: statistics.mean(ms) for kind, ms in per_request.items()}
    hidden = engine.hidden_size
    print(json.dumps({"latency": "engine", **{k: round(v, 1) for k, v in base.items()},
                      "per_request_ms": [round(ms, 1) for ms in per_request["1-image"]]}), flush=True)
    del engine
    if args.device == "cuda":
        torch.cuda.empty_cache()

    def report(row: dict) -> None:
        row["unary_vs_engine"] = round(row["unary_ms"] / base[row["request"]], 3)
        row["stream_vs_engine"] = round(row["stream_ms"] / base[row["request"]], 3)
        print(json.dumps(row), flush=True)

    paths = args.paths.split(",")
    if "grpc" in paths:
        for chunk_mb in [float(c) for c in args.chunk_mb.split(",")]:
            with contextlib.ExitStack() as stack:
                address = stack.enter_context(standalone_server(checkpoint, args, stream_chunk_mb=chunk_mb))
                client = stack.enter_context(EncoderClient(address, timeout=300))
                for kind, reqs in requests.items():
                    report({**latency_row("grpc", kind, lambda items: client.encode(items, copy=False),
                                          lambda items, on_item: client.encode_stream(items, on_item, copy=False),
                                          reqs, args.repeats), "chunk_mb": chunk_mb})
                for n in [int(c) for c in args.connections.split(",") if c]:
                    spread = stack.enter_context(EncoderClient(address, timeout=300, connections=n))
                    row = latency_row(f"grpc x{n} connections", "8-image",
                                      lambda items: client.encode(items, copy=False), spread.encode_stream,
                                      requests["8-image"], args.repeats)
                    report({**row, "chunk_mb": chunk_mb})
                if not args.skip_ttft and args.ttft_connections > 1:
                    client = stack.enter_context(EncoderClient(address, timeout=300, connections=args.ttft_connections))
                if not args.skip_ttft and chunk_mb == float(args.chunk_mb.split(",")[0]):
                    llm_dir = random_llm_dir(workdir, hidden, args.llm_layers)
                    print(json.dumps({"ttft_connections": args.ttft_connections}), flush=True)
                    engines = {mode: TimedEngine(client, llm_dir, args.device, mode, args.prefill_chunk)
                               for mode in (False, True)}
                    for name, (prompt, media) in ttft_prompts().items():
                        runs = {False: [], True: []}
                        for _ in range(args.repeats + 1):
                            for progressive, engine_ in engines.items():
                                runs[progressive].append(engine_.ttft(prompt, media))
                        unary = [r[0] for r in runs[False][1:]]
                        streamed = [r[0] for r in runs[True][1:]]
                        print(json.dumps({
                            "ttft": name, "unary_ms": round(1e3 * statistics.median(unary), 1),
                            "streamed_ms": round(1e3 * statistics.median(streamed), 1),
                            "streamed_vs_unary": round(statistics.median(streamed) / statistics.median(unary), 3),
                            "unary_first_chunk_ms": round(1e3 * statistics.median([r[1] for r in runs[False][1:]]), 1),
                            "streamed_first_chunk_ms": round(1e3 * statistics.median([r[1] for r in runs[True][1:]]), 1),
                            "llm": Path(llm_dir).name}), flush=True)
                    del engines
    if "serve-grpc" in paths or "serve-handle" in paths:
        from encoder_service.client.pool import PoolClientConfig, PoolEncoderClient

        with serve_pool(checkpoint, args) as address:
            if "serve-grpc" in paths:
                metadata = (("application", APP),)
                with EncoderClient(address, timeout=300) as client:
                    for kind, reqs in requests.items():
                        report(latency_row("serve-grpc", kind,
                                           lambda items: client.encode(items, metadata=metadata, copy=False),
                                           lambda items, on_item: client.encode_stream(items, on_item, metadata=metadata,
                                                                                       copy=False),
                                           reqs, args.repeats))
            if "serve-handle" in paths:
                pool = PoolEncoderClient(PoolClientConfig(application=APP, transport="handle", affinity=False,
                                                          probe=False))
                for kind, reqs in requests.items():
                    report(latency_row("serve-handle", kind, pool.encode, pool.encode_stream, reqs, args.repeats))
                pool.close()


if __name__ == "__main__":
    main()
