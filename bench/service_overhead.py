"""What Ray Serve + gRPC cost on top of the engine: same request mix, interleaved rounds.

- direct: `EncoderEngine.encode` in this process (no network, no serialization);
- serve, 1 client: the same requests one at a time through Ray Serve's gRPC proxy;
- serve, N clients: concurrent callers (the replica batches them).
Latency percentiles per request, throughput, and the embedding bytes/s that reached the client.

    python -m bench.service_overhead [--preset tiny-512 --requests 24 --concurrency 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import device_name, jpeg_mix, preset_checkpoint
from encoder_service.config import PRESETS, EngineConfig
from encoder_service.engine import EncoderEngine
from encoder_service.processor import MediaInput, Modality



def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny-512", choices=sorted(PRESETS))
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--images-per-request", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import ray
    from ray import serve

    from encoder_service.client import EncoderClient
    from encoder_service.serve_app import deploy, free_port, load_serve_config

    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    checkpoint = str(preset_checkpoint(args.preset, workdir))
    images = jpeg_mix(args.requests * args.images_per_request)
    requests = [
        [MediaInput(Modality.IMAGE, d) for d in images[i : i + args.images_per_request]]
        for i in range(0, len(images), args.images_per_request)
    ]

    cfg = load_serve_config()
    cfg["grpc_options"]["port"], cfg["http_options"]["port"] = free_port(), free_port()
    app = cfg["applications"][0]
    app["args"]["engine"]["checkpoint"] = checkpoint
    app["deployments"][0]["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    # Same compute on both sides: the replica gets as many torch threads as this process.
    import torch

    app["args"]["cpus_per_replica"] = torch.get_num_threads()
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        address = deploy(cfg)
        engine = EncoderEngine(EngineConfig(checkpoint=checkpoint))
        client = EncoderClient(address)
        metadata = (("application", app["name"]),)
        lat: dict[str, list[float]] = {"direct": [], "serve_1": []}
        wall: dict[str, list[float]] = {"direct": [], "serve_1": [], "serve_n": []}

        def timed(fn, items):
            t0 = time.perf_counter()
            out = fn(items)
            return time.perf_counter() - t0, out

        def serve_call(items):
            return client.encode(items, metadata=metadata)

        for r in range(args.rounds + 1):  # round 0 warms up both paths
            t0 = time.perf_counter()
            direct = [timed(engine.encode, items) for items in requests]
            t1 = time.perf_counter()
            served = [timed(serve_call, items) for items in requests]
            t2 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as ex:
                concurrent = list(ex.map(serve_call, requests))
            t3 = time.perf_counter()
            assert [c.token_counts for c in concurrent] == [o.token_counts for _, o in served]
            if r == 0:
                continue
            lat["direct"] += [d for d, _ in direct]
            lat["serve_1"] += [d for d, _ in served]
            wall["direct"].append(t1 - t0)
            wall["serve_1"].append(t2 - t1)
            wall["serve_n"].append(t3 - t2)
        tokens = sum(sum(o.token_counts) for _, o in served)
        bytes_per_round = sum(o.embeddings.numel() * o.embeddings.element_size() for _, o in served)
        med = {k: statistics.median(v) for k, v in wall.items()}
        result = {
            "bench": "service_overhead",
            "device": device_name(engine.device),
            "preset": args.preset,
            "requests": len(requests),
            "images_per_request": args.images_per_request,
            "tokens_per_round": tokens,
            "embedding_mb_per_round": round(bytes_per_round / 2**20, 2),
            "direct_p50_ms": round(1e3 * _percentile(lat["direct"], 0.5), 1),
            "serve_p50_ms": round(1e3 * _percentile(lat["serve_1"], 0.5), 1),
            "direct_p99_ms": round(1e3 * _percentile(lat["direct"], 0.99), 1),
            "serve_p99_ms": round(1e3 * _percentile(lat["serve_1"], 0.99), 1),
            "direct_req_per_s": round(len(requests) / med["direct"], 2),
            "serve_1_client_req_per_s": round(len(requests) / med["serve_1"], 2),
            f"serve_{args.concurrency}_clients_req_per_s": round(len(requests) / med["serve_n"], 2),
            "serve_1_client_over_direct_throughput": round(med["direct"] / med["serve_1"], 2),
            f"serve_{args.concurrency}_clients_over_direct_throughput": round(med["direct"] / med["serve_n"], 2),
            "serve_overhead_p50_ms": round(1e3 * (_percentile(lat["serve_1"], 0.5) - _percentile(lat["direct"], 0.5)), 1),
            "serve_embedding_mb_per_s": round(bytes_per_round / 2**20 / med["serve_1"], 1),
        }
        print(json.dumps(result))
        client.close()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
