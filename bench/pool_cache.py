"""What the pool's embedding cache saves on multi-turn chat, by router and client, side by side.

A trace of conversations (default 32 x 6 turns): each turn re-sends its conversation's images (1-3 to
start, sometimes one more), and a few popular images recur across conversations. It is replayed
through the Ray Serve pool's gRPC proxy by client processes (each interleaving its conversations'
turns), with 1, 2 and 4 replicas and four set-ups:
  no-cache          the cache off (every item encoded), Serve's default router, one call per turn;
  cache             the cache on, Serve's default router, one call per turn;
  affinity          the cache on, the content-affinity router, one call per item keyed by its digest;
  affinity+probe    affinity, items sent by digest first and uploaded only when missing.
Reported: the cache hit rate against the ideal (one unbounded cache: every repeat hits), encoder
device-seconds per turn (the replicas' device-busy time), request bytes per turn, p50/p99 latency of
turns whose items all hit and of turns with a miss. Then, on one replica: a repeated 640x480 JPEG
(hit) against a new one (miss), and a plain gRPC message of the hit's response size on loopback
(the transfer alone).

    python -m bench.pool_cache                                              # CPU, tiny-512
    python -m bench.pool_cache --preset radio-h --device cuda --replicas 2 --gpus-per-replica 0.5
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import device_name, jpeg_mix, preset_checkpoint
from bench.served_throughput import percentile
from encoder_service.config import PRESETS
from encoder_service.contract.media import MediaInput, Modality

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(640, 480), (1024, 768), (800, 600), (512, 512), (1280, 720), (300, 400)]
VARIANTS = ("no-cache", "cache", "affinity", "affinity+probe")


# ------------------------------------------------------------------ the trace


def make_trace(conversations: int, turns: int, popular: int = 4, seed: int = 0) -> tuple[list[list[list[int]]], int]:
    """Per conversation, per turn, the image ids it sends; ids below `popular` are shared."""
    rng = np.random.default_rng(seed)
    next_id = popular
    trace = []
    for _ in range(conversations):
        images, turns_of = [], []
        for turn in range(turns):
            if turn == 0 or (rng.random() < 0.35 and len(images) < 4):
                for _ in range(int(rng.integers(1, 4)) if turn == 0 else 1):
                    if rng.random() < 0.25:
                        images.append(int(rng.integers(popular)))
                    else:
                        images.append(next_id)
                        next_id += 1
            turns_of.append(list(dict.fromkeys(images)))
        trace.append(turns_of)
    return trace, next_id


def image_library(count: int, seed: int = 1) -> list[bytes]:
    return jpeg_mix(count, seed=seed, sizes=SIZES)


def ideal_hit_rate(trace) -> float:
    """One unbounded cache: every item sent before (by anyone) is a hit."""
    seen, hits, total = set(), 0, 0
    for turn in range(max(len(c) for c in trace)):
        for conversation in trace:
            for image in conversation[turn] if turn < len(conversation) else []:
                hits += image in seen
                total += 1
                seen.add(image)
    return hits / total


# ------------------------------------------------------------------ clients (separate processes)


def replay(address: str, app: str, variant: str, conversations, library: list[bytes], out: mp.Queue) -> None:
    """Each turn of these conversations in turn (turn 1 of each, then turn 2, ...): per-turn records."""
    from encoder_service.client.pool import PoolClientConfig, PoolEncoderClient
    from encoder_service.client.retry import RetryPolicy

    affinity = variant.startswith("affinity")
    pool = PoolEncoderClient(PoolClientConfig([address], app, affinity=affinity, probe=variant == "affinity+probe",
                                              retry=RetryPolicy(attempt_timeout_s=300, total_timeout_s=600)))
    records = []
    for turn in range(max(len(c) for c in conversations)):
        for conversation in conversations:
            if turn >= len(conversation):
                continue
            items = [MediaInput(Modality.IMAGE, library[i]) for i in conversation[turn]]
            sent = sum(t.client.bytes_sent for t in pool.transports)
            t0 = time.perf_counter()
            result = pool.encode(items)
            records.append({"ms": 1e3 * (time.perf_counter() - t0),
                            "bytes": sum(t.client.bytes_sent for t in pool.transports) - sent,
                            "image_bytes": sum(len(library[i]) for i in conversation[turn]),
                            "hits": [i.cache_hit for i in result.items]})
    pool.close()
    out.put(records)


def run_trace(address: str, app: str, variant: str, trace, library, clients: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    groups = [trace[i::clients] for i in range(clients)]
    procs = [ctx.Process(target=replay, args=(address, app, variant, g, library, out)) for g in groups if g]
    for p in procs:
        p.start()
    records = [r for _ in procs for r in out.get(timeout=3600)]
    for p in procs:
        p.join()
    return records


# ------------------------------------------------------------------ the pool


def pool_config(checkpoint: str, args, replicas: int, variant: str) -> dict:
    """The deploy/serve_config.yaml pool as the variant runs it, as an application of its own: Serve's proxies
    keep the router a deployment first had, so each variant gets a new name (`app_name`)."""
    from encoder_service.serving.api.serve.local import load_serve_config

    cfg = copy.deepcopy(load_serve_config())
    cfg["grpc_options"]["port"], cfg["http_options"]["port"] = args.port, args.port + 1
    app = cfg["applications"][0]
    app["name"], app["route_prefix"] = app_name(replicas, variant), f"/{app_name(replicas, variant)}"
    app["args"].update(gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.preprocess_workers + 1)
    app["args"]["engine"].update(checkpoint=checkpoint, device=args.device, max_tokens_per_request=1 << 20)
    app["args"]["pipeline"].update(preprocess_workers=args.preprocess_workers,
                                   cache_mb=0 if variant == "no-cache" else args.cache_mb)
    deployment = app["deployments"][0]
    deployment["autoscaling_config"].update(min_replicas=replicas, max_replicas=replicas)
    if not variant.startswith("affinity"):
        del deployment["request_router_config"]  # Serve's default (power of two choices)
    return cfg


def app_name(replicas: int, variant: str) -> str:
    return f"encoder-{replicas}-{variant.replace('+', '-')}"


def replica_stats(app: str, replicas: int) -> list[dict]:
    """Every replica's counters: ask until each one has answered (routing picks the replica)."""
    from ray import serve

    handle = serve.get_deployment_handle("EncoderDeployment", app_name=app).options(method_name="replica_stats")
    seen: dict[str, dict] = {}
    for attempt in range(400):
        stats = handle.options(session_id=f"probe-{attempt}").remote().result(timeout_s=60)
        seen[stats["replica"]] = stats
        if len(seen) == replicas:
            break
    return list(seen.values())


def warm_routes(address: str, app: str, replicas: int) -> None:
    """Until the proxy's router has sent requests to every replica (it learns them over its first calls;
    a partly known ring would move keys mid-trace)."""
    from encoder_service.client.endpoint import EncoderClient

    tiny = MediaInput(Modality.IMAGE, image_library(1, seed=3)[0])
    seen = set()
    with EncoderClient(address, timeout=300) as client:
        for attempt in range(400):
            result = client.encode([tiny], metadata=(("application", app), ("session_id", f"warm-{attempt}")))
            seen.add(result.extras["replica"])
            if len(seen) == replicas:
                break
            time.sleep(0.05)


def measure(checkpoint: str, args, replicas: int, variant: str, trace, library) -> dict:
    from ray import serve

    from encoder_service.serving.api.serve.local import deploy

    app = app_name(replicas, variant)
    address = deploy(pool_config(checkpoint, args, replicas, variant))
    warm_routes(address, app, replicas)
    before = {s["replica"]: s for s in replica_stats(app, replicas)}
    records = run_trace(address, app, variant, trace, library, args.clients)
    stats = [{k: s[k] - before[s["replica"]][k] for k in ("device_busy_s", "jobs_started")}
             for s in replica_stats(app, replicas)]
    serve.delete(app)
    items = [h for r in records for h in r["hits"]]
    repeats = [r for r in records if all(r["hits"])]
    hit_turns = [r["ms"] for r in repeats]
    miss_turns = [r["ms"] for r in records if not all(r["hits"])]
    return {
        "replicas": replicas, "variant": variant, "turns": len(records),
        "hit_rate": round(sum(items) / len(items), 3),
        "device_s_per_turn": round(sum(s["device_busy_s"] for s in stats) / len(records), 4),
        "items_encoded": sum(s["jobs_started"] for s in stats),
        "request_kb_per_turn": round(sum(r["bytes"] for r in records) / len(records) / 1e3, 2),
        # A turn whose images were all cached: request bytes against the images' own bytes.
        "repeat_turn_bytes_vs_images": round(
            sum(r["bytes"] for r in repeats) / max(1, sum(r["image_bytes"] for r in repeats)), 4),
        "hit_turn_p50_ms": round(percentile(hit_turns, 0.5), 1) if hit_turns else None,
        "hit_turn_p99_ms": round(percentile(hit_turns, 0.99), 1) if hit_turns else None,
        "miss_turn_p50_ms": round(percentile(miss_turns, 0.5), 1) if miss_turns else None,
        "miss_turn_p99_ms": round(percentile(miss_turns, 0.99), 1) if miss_turns else None,
    }


# ------------------------------------------------------------------ one image: hit, miss, transfer


def transfer_alone(nbytes: int, repeats: int) -> float:
    """Median ms of a plain unary gRPC message of `nbytes` on loopback (bench.grpc_transport's server)."""
    import grpc

    from bench.grpc_transport import serve as transport_server
    from encoder_service.contract.wire.channel import channel_options

    ctx = mp.get_context("spawn")
    port_out = ctx.Queue()
    server = ctx.Process(target=transport_server, args=(port_out, nbytes, nbytes), daemon=True)
    server.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port_out.get(timeout=60)}", options=channel_options())
        unary = channel.unary_unary("/bench.Transport/Unary")
        for _ in range(3):
            unary(b"", timeout=60)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            unary(b"", timeout=60)
            times.append(time.perf_counter() - t0)
        channel.close()
        return 1e3 * statistics.median(times)
    finally:
        server.terminate()


def hit_and_miss_latency(encode, repeats: int) -> tuple[float, float, int]:
    """Median ms of a new 640x480 JPEG (miss) and of one repeated (hit), idle; the response's bytes."""
    news = [MediaInput(Modality.IMAGE, data) for data in image_library(len(SIZES) * (repeats + 2), seed=5)[:: len(SIZES)]]
    miss, hit = [], []
    for item in news:
        t0 = time.perf_counter()
        encode(item)
        miss.append(1e3 * (time.perf_counter() - t0))
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        result = encode(news[0])
        hit.append(1e3 * (time.perf_counter() - t0))
    assert result.items[0].cache_hit
    return statistics.median(miss[2:]), statistics.median(hit[2:]), result.embeddings.numel() * result.embeddings.element_size()


def hit_vs_miss(checkpoint: str, args, paths: tuple[str, ...] = ("serve-grpc", "grpc")) -> list[dict]:
    """Idle, one replica / one server: a repeated 640x480 JPEG against new ones, and the transfer alone,
    through the Serve proxy and through the standalone gRPC server."""
    from ray import serve

    from bench.served_throughput import standalone_server
    from encoder_service.client.endpoint import EncoderClient
    from encoder_service.serving.api.serve.local import deploy

    rows = []
    if "serve-grpc" in paths:
        app = app_name(1, "latency")
        address = deploy(pool_config(checkpoint, args, 1, "latency"))
        with EncoderClient(address, timeout=300) as client:
            rows.append(("serve-grpc", *hit_and_miss_latency(
                lambda item: client.encode([item], metadata=(("application", app),), copy=False), args.repeats)))
        serve.delete(app)
    if "grpc" in paths:
        args.dtype = "auto"
        with standalone_server(checkpoint, args, cache_mb=args.cache_mb) as address, \
                EncoderClient(address, timeout=300) as client:
            rows.append(("grpc", *hit_and_miss_latency(lambda item: client.encode([item], copy=False), args.repeats)))
    out = []
    for path, miss_ms, hit_ms, nbytes in rows:
        transfer = transfer_alone(nbytes, args.repeats)
        out.append({"path": path, "image": "640x480 JPEG", "response_mb": round(nbytes / 1e6, 2),
                    "miss_ms": round(miss_ms, 1), "hit_ms": round(hit_ms, 1), "miss_over_hit": round(miss_ms / hit_ms, 1),
                    "transfer_alone_ms": round(transfer, 1), "hit_over_transfer": round(hit_ms / transfer, 2)})
    return out


# ------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny-512", choices=sorted(PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--gpus-per-replica", type=float, default=0)
    p.add_argument("--replicas", default="1,2,4")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--clients", type=int, default=8, help="client processes, each interleaving its conversations")
    p.add_argument("--preprocess-workers", type=int, default=1)
    p.add_argument("--cache-mb", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--workdir", default=None)
    p.add_argument("--latency-only", action="store_true",
                   help="only the idle hit/miss/transfer latencies on the standalone server (no Ray, no trace)")
    args = p.parse_args()
    if args.latency_only:
        checkpoint = str(preset_checkpoint(args.preset, Path(args.workdir or tempfile.mkdtemp(prefix="bench-"))))
        print(json.dumps({"bench": "pool_cache", "device": device_name(torch.device(args.device)), "preset": args.preset}))
        for row in hit_vs_miss(checkpoint, args, paths=("grpc",)):
            print(json.dumps(row), flush=True)
        return

    import ray

    from encoder_service.serving.api.serve.local import free_port, local_auth

    args.port = args.port or free_port()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-"))
    checkpoint = str(preset_checkpoint(args.preset, workdir))
    trace, count = make_trace(args.conversations, args.turns)
    library = image_library(count)
    print(json.dumps({"bench": "pool_cache", "device": device_name(torch.device(args.device)), "preset": args.preset,
                      "conversations": args.conversations, "turns": args.turns, "images": count,
                      "items": sum(len(t) for c in trace for t in c), "ideal_hit_rate": round(ideal_hit_rate(trace), 3),
                      "clients": args.clients, "cpus": os.cpu_count()}), flush=True)
    gpus = 1 if args.device == "cuda" else 0
    most = max(int(r) for r in args.replicas.split(","))  # logical CPUs enough to place every replica
    local_auth()  # the pool requires a bearer token: the replicas and this process's clients share it
    ray.init(address="local", num_cpus=max(2 * (os.cpu_count() or 2), most * (args.preprocess_workers + 1) + 2), num_gpus=gpus,
             include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}})
    ideal = ideal_hit_rate(trace)
    try:
        for replicas in [int(r) for r in args.replicas.split(",")]:
            for variant in args.variants.split(","):
                row = measure(checkpoint, args, replicas, variant, trace, library)
                row["vs_ideal"] = round(row["hit_rate"] / ideal, 3)
                print(json.dumps(row), flush=True)
        for row in hit_vs_miss(checkpoint, args):
            print(json.dumps(row), flush=True)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
