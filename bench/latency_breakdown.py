"""Where an idle one-image call's time goes: in the engine, in the server's pipeline, on the way.

For each image of the serving mix, one request at a time (the server's cache off): the engine's own
in-process `encode` (its preprocessing and forward times), the standalone gRPC server's pipeline for
the same request (its `total_ms`, `preprocess_ms`, `queue_ms`, `forward_ms`, from the answer's extras)
and what the client waited for a unary `Encode` (read in place). client − server total is the way
there and back: the request's hop into the model process, framing the rows, moving them, reading them.

The served part runs once per malloc setting, side by side (`serving.heap`): `mmap`, glibc as it is
(blocks above 32 MiB freshly mapped: the server with `--mmap-large-buffers`); `heap-server`, the
server's default (its processes keep large buffers in the heap); `heap`, the client process too.

    python -m bench.latency_breakdown --preset radio-h --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import IMAGE_MIXES, device_name, jpeg_mix, preset_checkpoint
from bench.served_throughput import as_items, standalone_server
from encoder_service.client.endpoint import EncoderClient
from encoder_service.config import EngineConfig
from encoder_service.engine import EncoderEngine
from encoder_service.serving.heap import keep_large_buffers_in_heap

SERVER_STATS = ("total_ms", "preprocess_ms", "queue_ms", "forward_ms")


def median_of(fn, repeats: int) -> tuple[float, list]:
    """(median ms of `repeats` calls after a warm-up, what the calls returned)."""
    fn()
    times, outs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs.append(fn())
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), outs


def engine_rows(checkpoint: str, args, requests) -> list[dict]:
    """The in-process engine's time per request, with its preprocessing and forward parts."""
    engine = EncoderEngine(EngineConfig(checkpoint=checkpoint, device=args.device, dtype=args.dtype,
                                        max_tokens_per_request=1 << 30, preprocess_threads=args.preprocess_workers))
    rows = []
    for items in requests:
        ms, outs = median_of(lambda items=items: engine.encode(items), args.repeats)
        rows.append({"engine_ms": ms,
                     "engine_preprocess_ms": statistics.median(o.extras["preprocess_ms"] for o in outs),
                     "engine_forward_ms": statistics.median(o.extras["forward_ms"] for o in outs)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny-5120")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--preprocess-workers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--workdir", default=None)
    p.add_argument("--malloc", default="mmap,heap-server,heap", help="served runs, in this order (heap last)")
    args = p.parse_args()
    checkpoint = str(preset_checkpoint(args.preset, Path(args.workdir or tempfile.mkdtemp(prefix="bench-"))))
    requests = [as_items([data]) for data in jpeg_mix(len(IMAGE_MIXES["serving"]), seed=7)]
    print(json.dumps({"bench": "latency_breakdown", "device": device_name(torch.device(args.device)),
                      "preset": args.preset, "preprocess_workers": args.preprocess_workers}), flush=True)
    rows = engine_rows(checkpoint, args, requests)
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the engine is gone: its memory goes back before the server loads
    for malloc in args.malloc.split(","):  # `heap` last: the client's setting stays for the process's life
        if malloc == "heap":
            keep_large_buffers_in_heap()
        extra = ("--mmap-large-buffers",) if malloc == "mmap" else ()
        with standalone_server(checkpoint, args, extra=extra) as address, EncoderClient(address, timeout=300) as client:
            for engine_row, items in zip(rows, requests):
                ms, results = median_of(lambda items=items: client.encode(items, copy=False), args.repeats)
                row = {"malloc": malloc, **engine_row, "client_ms": ms}
                for key in SERVER_STATS:
                    row[f"server_{key}"] = statistics.median(r.extras.get(key, float("nan")) for r in results)
                answer = results[-1].embeddings
                row["answer_mb"] = answer.numel() * answer.element_size() / 1e6
                row["outside_server_ms"] = row["client_ms"] - row["server_total_ms"]
                print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
