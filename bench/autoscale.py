"""Autoscaling on the encoder's load (ViT tokens) against Serve's default (requests in flight), on a
bursty trace of mixed work, side by side.

Open-loop arrivals from client processes: bursts of `--burst-s` seconds separated by idle gaps; in a
burst, requests arrive at `--rate`/s, each light (one 256x256 image: 1 tile) or, with probability
`--heavy`, heavy (a 24-frame clip: 24 tiles), on the `tiny-512` preset (Nemotron's 512 px tiles, 256
tokens each). Every item is new (the cache answers nothing). Both
pools: min 1, max `--max-replicas` replicas, the same delays. The default policy aims at
`--target-ongoing` requests per replica; the token policy at `--target-tokens` pending ViT tokens.
Reported per policy: latency p50/p99 of light and heavy requests, replica-seconds used, the replica
count over time (sampled each second), and requests that failed.

    python -m bench.autoscale                       # CPU, tiny model
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.served_throughput import percentile

ROOT = Path(__file__).resolve().parents[1]


def client(address: str, app: str, seed: int, start_at: float, schedule: list[tuple[float, bool]], out: mp.Queue) -> None:
    """Send each request of `schedule` ((offset s, heavy)) at its time, on threads (open loop)."""
    import threading

    from encoder_service.client.pool import PoolClientConfig, PoolEncoderClient

    from encoder_service.client.retry import RetryPolicy
    from encoder_service.contract.media import MediaInput, Modality

    rng = np.random.default_rng(seed)
    pool = PoolEncoderClient(PoolClientConfig([address], app, affinity=False, probe=False,
                                              retry=RetryPolicy(attempt_timeout_s=120, total_timeout_s=240)))
    records, lock = [], threading.Lock()

    def one(heavy: bool) -> None:
        if heavy:
            item = MediaInput(Modality.VIDEO, rng.integers(0, 256, (24, 512, 512, 3), dtype=np.uint8))
        else:
            item = MediaInput(Modality.IMAGE, rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
        t0 = time.perf_counter()
        try:
            pool.encode([item])
            ok = True
        except Exception:  # noqa: BLE001 - counted
            ok = False
        with lock:
            records.append({"heavy": heavy, "ms": 1e3 * (time.perf_counter() - t0), "ok": ok})

    threads = []
    for offset, heavy in schedule:
        time.sleep(max(0.0, start_at + offset - time.time()))
        t = threading.Thread(target=one, args=(heavy,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    pool.close()
    out.put(records)


def make_schedule(args, seed: int) -> list[tuple[float, bool]]:
    rng = np.random.default_rng(seed)
    schedule, t = [], 0.0
    for _ in range(args.bursts):
        end = t + args.burst_s
        while t < end:
            t += rng.exponential(1.0 / args.rate)
            schedule.append((t, bool(rng.random() < args.heavy)))
        t = end + args.gap_s
    return schedule


def run_policy(policy: str, args, checkpoint: str, port: int) -> dict:
    from ray import serve

    from encoder_service.serving.api.serve.local import deploy, load_serve_config, running_replicas

    app = f"encoder-{policy}"
    cfg = copy.deepcopy(load_serve_config())
    cfg["grpc_options"]["port"], cfg["http_options"]["port"] = port, port + 1
    a = cfg["applications"][0]
    a["name"], a["route_prefix"] = app, f"/{app}"
    a["args"].update(gpus_per_replica=0, cpus_per_replica=1)
    a["args"]["engine"].update(checkpoint=checkpoint, device="cpu")
    a["args"]["pipeline"].update(preprocess_workers=1, cache_mb=0)
    scaling = a["deployments"][0]["autoscaling_config"]
    scaling.update(min_replicas=1, max_replicas=args.max_replicas, upscale_delay_s=2, downscale_delay_s=8,
                   look_back_period_s=2, metrics_interval_s=0.5)
    if policy == "default":
        del scaling["policy"]
        scaling["target_ongoing_requests"] = args.target_ongoing
    else:
        scaling["policy"]["policy_kwargs"]["target_pending_tokens"] = args.target_tokens
    address = deploy(cfg)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start_at = time.time() + 2.0
    procs = [ctx.Process(target=client, args=(address, app, seed, start_at, make_schedule(args, seed), out))
             for seed in range(args.clients)]
    for p in procs:
        p.start()
    replicas, end = [], start_at + args.bursts * (args.burst_s + args.gap_s) + 5
    while time.time() < end:
        replicas.append(running_replicas(app))
        time.sleep(1.0)
    records = [r for _ in procs for r in out.get(timeout=600)]
    for p in procs:
        p.join()
    serve.delete(app)
    light = [r["ms"] for r in records if not r["heavy"] and r["ok"]]
    heavy = [r["ms"] for r in records if r["heavy"] and r["ok"]]
    return {"policy": policy, "requests": len(records), "failed": sum(not r["ok"] for r in records),
            "light_p50_ms": round(percentile(light, 0.5), 1), "light_p99_ms": round(percentile(light, 0.99), 1),
            "heavy_p50_ms": round(percentile(heavy, 0.5), 1), "heavy_p99_ms": round(percentile(heavy, 0.99), 1),
            "replica_seconds": sum(replicas), "max_replicas_seen": max(replicas), "replicas_each_s": replicas}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny-512")
    p.add_argument("--bursts", type=int, default=2)
    p.add_argument("--burst-s", type=float, default=20.0)
    p.add_argument("--gap-s", type=float, default=15.0)
    p.add_argument("--rate", type=float, default=1.0, help="arrivals per second per client process in a burst")
    p.add_argument("--heavy", type=float, default=0.3, help="share of heavy requests")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--max-replicas", type=int, default=3)
    p.add_argument("--target-ongoing", type=float, default=4)
    p.add_argument("--target-tokens", type=int, default=32768)
    p.add_argument("--policies", default="default,tokens")
    args = p.parse_args()

    import ray
    from ray import serve

    from bench.common import preset_checkpoint
    from encoder_service.serving.api.serve.local import free_port, local_auth

    print(json.dumps({"bench": "autoscale", "cpus": os.cpu_count(), **{k: v for k, v in vars(args).items()}}), flush=True)
    local_auth()  # the pool requires a bearer token: the replicas and this process's clients share it
    ray.init(address="local", num_cpus=2 * (os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}})
    port = free_port()
    checkpoint = preset_checkpoint(args.preset, Path(tempfile.mkdtemp(prefix="bench-autoscale-")))
    try:
        for policy in args.policies.split(","):
            print(json.dumps(run_policy(policy, args, str(checkpoint), port)), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
