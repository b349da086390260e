"""vLLM alone against vLLM fed by the encoder pool (EPD), on a multi-turn image chat trace, side by side.

Both serve the tiny random InternVL (encoder_service.integrations.vllm.tiny_model) through vLLM's
OpenAI server on the CPU, in the vLLM environment of scripts/vllm_env.sh:
  alone:   vLLM runs its own vision encoder for every image it has not cached;
  pool:    the front end sends each turn's images to the pool (probe, then upload), vLLM's connector
           fetches the rows by digest, vLLM's vision encoder never runs.
Conversations run concurrently (`--clients` threads), each turn re-sending the conversation's images
(1-3 to start, sometimes one more). Reported per path: time to first token p50/p99, request latency
p50, requests/s and output tokens/s over the trace; for the pool, the images it encoded.

What a tiny CPU model can and cannot show: the model's vision tower is a 2-layer ViT of width 64, so
encoding costs vLLM almost nothing and the pool's extra hops (front end, gRPC, staging) dominate: this
bench measures the integration's overhead, not EPD's benefit, which needs a vision encoder that costs
real GPU time (RADIO-H / InternViT-300M on GPUs; vLLM's GPU build is not available on the GPU machine here).

    python -m bench.vllm_epd [--conversations 8 --turns 4 --clients 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from bench.served_throughput import percentile
from encoder_service.integrations.vllm.launch import consumer_config, start_frontend, start_vllm_server, stop, wait_http
from encoder_service.integrations.vllm.openai import chat_messages, post_stream
from encoder_service.integrations.vllm.tiny_model import build
from encoder_service.serving.api.serve.local import free_port

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(640, 480), (500, 375), (300, 300), (800, 600), (200, 400)]


def make_trace(conversations: int, turns: int, workdir: Path, seed: int = 0) -> list[list[list[str]]]:
    rng = np.random.default_rng(seed)
    trace, count = [], 0
    for _ in range(conversations):
        images, turns_of = [], []
        for turn in range(turns):
            if turn == 0 or (rng.random() < 0.35 and len(images) < 4):
                for _ in range(int(rng.integers(1, 4)) if turn == 0 else 1):
                    w, h = SIZES[count % len(SIZES)]
                    path = workdir / f"image{count}.png"
                    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
                    images.append(str(path))
                    count += 1
            turns_of.append(list(images))
        trace.append(turns_of)
    return trace


def replay(url: str, model: str, trace, clients: int, max_tokens: int) -> dict:
    records, lock = [], threading.Lock()

    def conversation(turns: list[list[str]]) -> None:
        for images in turns:
            started = time.perf_counter()
            first: list[float] = []
            text = post_stream(url, {"model": model, "messages": chat_messages(images), "max_tokens": max_tokens,
                                     "temperature": 0.0, "ignore_eos": True, "stream": True},
                               on_first=lambda: first.append(time.perf_counter()))
            done = time.perf_counter()
            with lock:
                records.append({"ttft": (first[0] if first else done) - started, "latency": done - started,
                                "chars": len(text)})

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(conversation, trace))
    wall = time.perf_counter() - started
    ttft = [r["ttft"] for r in records]
    return {"requests": len(records), "ttft_p50_ms": round(1e3 * statistics.median(ttft), 1),
            "ttft_p99_ms": round(1e3 * percentile(ttft, 0.99), 1),
            "latency_p50_ms": round(1e3 * statistics.median(r["latency"] for r in records), 1),
            "requests_per_s": round(len(records) / wall, 2),
            "output_tokens_per_s": round(len(records) * max_tokens / wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-epd-"))
    subprocess.run([str(ROOT / "scripts" / "vllm_env.sh")], cwd=ROOT, check=True)
    python = str(ROOT / ".venv-vllm" / "bin" / "python")
    model = str(build(workdir / "model"))
    trace = make_trace(args.conversations, args.turns, workdir)
    images = len({i for c in trace for t in c for i in t})
    print(json.dumps({"bench": "vllm_epd", "model": "tiny InternVL (vision 2x64, LLM 2x128)", "device": "CPU",
                      "conversations": args.conversations, "turns": args.turns, "images": images,
                      "clients": args.clients}), flush=True)
    flags = ("--dtype", "float32", "--max-model-len", "4096", "--enforce-eager", "--limit-mm-per-prompt",
             json.dumps({"image": 4}))
    vllm_port = free_port()
    vllm_url = f"http://127.0.0.1:{vllm_port}"

    server = start_vllm_server(python, model, vllm_port, None, workdir / "alone.log", *flags)
    try:
        wait_http(f"{vllm_url}/health", server, workdir / "alone.log")
        print(json.dumps({"path": "vllm-alone", **replay(f"{vllm_url}/v1/chat/completions", model, trace,
                                                         args.clients, args.max_tokens)}), flush=True)
    finally:
        stop(server)

    pool_port, front_port, metrics_port = free_port(), free_port(), free_port()
    pool = subprocess.Popen([sys.executable, "-m", "encoder_service.cli", "serve", "--port", str(pool_port),
                             "--checkpoint", model, "--device", "cpu", "--cache-mb", "256", "--preprocess-workers", "1",
                             "--metrics-port", str(metrics_port)], stdout=subprocess.PIPE, text=True)
    pool.stdout.readline()  # "encoder-service listening on ..."
    address = f"127.0.0.1:{pool_port}"
    server = start_vllm_server(python, model, vllm_port, consumer_config(address), workdir / "consumer.log", *flags)
    front = start_frontend(address, vllm_url, front_port, workdir / "front.log")
    try:
        wait_http(f"{vllm_url}/health", server, workdir / "consumer.log")
        wait_http(f"http://127.0.0.1:{front_port}/health", front, workdir / "front.log")
        row = replay(f"http://127.0.0.1:{front_port}/v1/chat/completions", model, trace, args.clients, args.max_tokens)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as metrics:
            encoded = next(float(line.split()[-1]) for line in metrics.read().decode().splitlines()
                           if line.startswith("encoder_jobs_started_total"))
        print(json.dumps({"path": "vllm+pool", **row, "images_encoded_by_pool": int(encoded)}), flush=True)
    finally:
        stop(front, server, pool)


if __name__ == "__main__":
    main()
