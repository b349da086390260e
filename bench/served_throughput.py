"""What a client gets from each serving path, side by side with what the engine can do.

Paths, in one run, same checkpoint, same requests (2 serving-mix JPEGs each):
- engine: `EncoderEngine.run` on preprocessed tiles, output left on the device ("packed on
  device": the denominator of every ratio), output copied to the host, and `encode` end to
  end (decode + tiling in threads, in-process);
- grpc: the standalone server (`encoder-service serve`, its own process);
- serve-grpc: Ray Serve's gRPC proxy in front of one replica;
- serve-handle: the Ray-native path (DeploymentHandle, tensor through the object store).
Clients are separate processes (spawned processes for gRPC, Ray actors for the handle), each
in a closed loop for `--duration` seconds after a warm-up; 1, 4 and 16 of them. Each client has
requests of its own (the same mix, other images) and the servers' embedding caches are off, so
every request is encoded: this bench measures encoding, `bench.pool_cache` what the cache saves. Reported:
tiles/s, embedding MB/s, p50/p99 latency, ratio to the engine, mean GPU utilisation. Then idle
latency: one 1-image request at a time, each image of the mix, against `engine.encode`.

    python -m bench.served_throughput                                      # CPU: tiny-5120, fp32
    python -m bench.served_throughput --preset radio-h --device cuda --preprocess-workers 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import IMAGE_MIXES, device_name, jpeg_mix, preset_checkpoint
from encoder_service.config import PRESETS, EngineConfig
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.engine import EncoderEngine

APP = "encoder"
ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def make_requests(n: int, images_per_request: int, seed: int = 0) -> list[list[bytes]]:
    images = jpeg_mix(n * images_per_request, seed=seed)
    return [images[i : i + images_per_request] for i in range(0, len(images), images_per_request)]


def as_items(jpegs: list[bytes]) -> list[MediaInput]:
    return [MediaInput(Modality.IMAGE, data) for data in jpegs]


# ------------------------------------------------------------------ client loops (separate processes)


def warm_up(encode, requests: list[list[bytes]]) -> None:
    for jpegs in requests[:2]:  # connections, first batches
        encode(as_items(jpegs))


def closed_loop(encode, requests: list[list[bytes]], index: int, start_at: float, end_at: float) -> dict:
    """Send requests back to back; count what completes inside [start_at, end_at]."""
    time.sleep(max(0.0, start_at - time.time()))
    latencies, tiles, nbytes, i, extras = [], 0, 0, index, []
    while time.time() < end_at:
        jpegs = requests[i % len(requests)]
        i += 1
        t0 = time.time()
        result = encode(as_items(jpegs))
        t1 = time.time()
        if t1 <= end_at:
            latencies.append(t1 - t0)
            tiles += sum(item.num_tiles for item in result.items)
            nbytes += result.embeddings.numel() * result.embeddings.element_size()
            extras.append({k: v for k, v in result.extras.items() if isinstance(v, (int, float))})
    return {"latencies": latencies, "tiles": tiles, "bytes": nbytes, "extras": extras}


def grpc_client_process(address: str, metadata, requests, index, ready: mp.Queue, window: mp.Queue,
                        out: mp.Queue) -> None:
    from encoder_service.client.endpoint import EncoderClient

    with EncoderClient(address, timeout=600) as client:
        encode = lambda items: client.encode(items, metadata=metadata, copy=False)  # noqa: E731
        warm_up(encode, requests)
        ready.put(index)
        start_at, end_at = window.get()
        out.put(closed_loop(encode, requests, index, start_at, end_at))


def client_requests(requests, index: int) -> list[list[bytes]]:
    """Client `index`'s own requests: the same sizes, other images (no two clients send one item)."""
    return requests if index == 0 else make_requests(len(requests), len(requests[0]), seed=1000 + index)


def run_grpc_clients(address: str, n: int, requests, duration: float, metadata=None, on_window=None) -> dict:
    """n client processes; the measured window opens once every one of them is warm. `on_window(start,
    end)`: told the window's wall-clock bounds (time.time()) before it opens."""
    ctx = mp.get_context("spawn")
    ready, window, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=grpc_client_process,
                         args=(address, metadata, client_requests(requests, i), i, ready, window, out))
             for i in range(n)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=300)
    start_at = time.time() + 0.5
    if on_window is not None:
        on_window(start_at, start_at + duration)
    for _ in procs:
        window.put((start_at, start_at + duration))
    with gpu_sampler() as util:
        time.sleep(max(0.0, start_at - time.time()))
        parts = [out.get(timeout=120 + duration) for _ in procs]
    for p in procs:
        p.join()
    return summarise(parts, duration, util)


def run_handle_clients(n: int, requests, duration: float) -> dict:
    import ray

    @ray.remote(num_cpus=0)
    class HandleClient:
        def __init__(self, requests):
            from encoder_service.client.pool import PoolClientConfig, PoolEncoderClient
            from encoder_service.client.retry import RetryPolicy

            self.requests = requests
            retry = RetryPolicy(attempt_timeout_s=600, total_timeout_s=600)
            self.pool = PoolEncoderClient(PoolClientConfig(application=APP, transport="handle", tenant="bench", retry=retry,
                                                           affinity=False, probe=False))

        def warm_up(self):
            warm_up(self.pool.encode, self.requests)

        def run(self, index, start_at, end_at):
            return closed_loop(self.pool.encode, self.requests, index, start_at, end_at)

    actors = [HandleClient.remote(client_requests(requests, i)) for i in range(n)]
    ray.get([a.warm_up.remote() for a in actors], timeout=300)
    start_at = time.time() + 0.5
    refs = [a.run.remote(i, start_at, start_at + duration) for i, a in enumerate(actors)]
    with gpu_sampler() as util:
        parts = ray.get(refs, timeout=120 + duration)
    for a in actors:
        ray.kill(a)
    return summarise(parts, duration, util)


def summarise(parts: list[dict], duration: float, util: list[float]) -> dict:
    latencies = [x for p in parts for x in p["latencies"]]
    extras = [e for p in parts for e in p["extras"]]
    server = {f"server_{k}_p50": statistics.median(e[k] for e in extras if k in e)
              for k in ("batch_tiles", "batch_requests", "preprocess_ms", "queue_ms", "forward_ms")
              if any(k in e for e in extras)}
    return {
        "requests": len(latencies),
        "tiles_per_s": sum(p["tiles"] for p in parts) / duration,
        "mb_per_s": sum(p["bytes"] for p in parts) / duration / 1e6,
        "p50_ms": 1e3 * percentile(latencies, 0.5),
        "p99_ms": 1e3 * percentile(latencies, 0.99),
        "gpu_util": round(statistics.mean(util), 1) if util else None,
        **server,
    }


@contextlib.contextmanager
def gpu_sampler():
    """Mean GPU utilisation (nvidia-smi, every 200 ms) over the block; empty on CPU machines."""
    samples: list[float] = []
    proc = None
    if torch.cuda.is_available():
        proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                 "-lms", "200"], stdout=subprocess.PIPE, text=True)
    try:
        yield samples
    finally:
        if proc is not None:
            proc.terminate()
            samples += [float(line) for line in proc.communicate()[0].split() if line.strip().isdigit()]


# ------------------------------------------------------------------ idle latency


def idle_latency(encode, repeats: int) -> dict[str, float]:
    """Median latency of a 1-image request per image size of the mix, one request at a time."""
    out = {}
    for (w, h), data in zip(IMAGE_MIXES["serving"], jpeg_mix(len(IMAGE_MIXES["serving"]), seed=7)):
        items = as_items([data])
        encode(items)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            encode(items)
            times.append(time.perf_counter() - t0)
        out[f"{w}x{h}"] = 1e3 * statistics.median(times)
    return out


# ------------------------------------------------------------------ the engine alone


def engine_baseline(cfg: EngineConfig, requests, repeats: int) -> tuple[dict, dict]:
    engine = EncoderEngine(cfg)
    items = [item for jpegs in requests for item in as_items(jpegs)]
    processed = engine.prepare(items)
    tiles = sum(p.num_tiles for p in processed)
    rows = sum(engine.piece_rows(size) for p in processed for size in p.sizes)
    nbytes = rows * engine.hidden_size * torch.empty(0, dtype=engine.dtype).element_size()

    def timed(fn, repeats: int = repeats) -> float:
        fn()  # warm-up
        engine.synchronize()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            engine.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    device_s = timed(lambda: engine.run(processed, output_device=str(engine.device)))
    host_s = timed(lambda: engine.run(processed))
    # End to end goes request by request (slow): one timed pass after the warm-up.
    encode_s = timed(lambda: [engine.encode(as_items(jpegs)) for jpegs in requests], repeats=1)
    result = {
        "tiles": tiles,
        "packed_on_device_tiles_per_s": tiles / device_s,
        "packed_on_device_mb_per_s": nbytes / device_s / 1e6,
        "packed_to_host_tiles_per_s": tiles / host_s,
        "encode_e2e_tiles_per_s": tiles / encode_s,
        "encode_e2e_mb_per_s": nbytes / encode_s / 1e6,
    }
    latency = idle_latency(engine.encode, repeats)
    engine = processed = None  # freed before the cache is emptied (the closures above are done with them)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result, latency


# ------------------------------------------------------------------ the servers


@contextlib.contextmanager
def standalone_server(checkpoint: str, args, cache_mb: int = 0, stream_chunk_mb: float = 16.0,
                      extra: tuple[str, ...] = ()):
    """`encoder-service serve` on a free port, as a process of its own; yields its address."""
    with standalone_server_process(checkpoint, args, cache_mb, stream_chunk_mb, extra) as (address, _):
        yield address


@contextlib.contextmanager
def standalone_server_process(checkpoint: str, args, cache_mb: int = 0, stream_chunk_mb: float = 16.0,
                              extra: tuple[str, ...] = ()):
    """`standalone_server`, yielding (address, the server's process)."""
    cmd = [sys.executable, "-m", "encoder_service.cli", "serve", "--port", "0", "--checkpoint", checkpoint,
           "--device", args.device, "--dtype", args.dtype, "--max-tokens-per-request", str(1 << 20),
           "--cache-mb", str(cache_mb), "--stream-chunk-mb", str(stream_chunk_mb),
           "--preprocess-workers", str(args.preprocess_workers),
           "--preprocess-device", getattr(args, "preprocess_device", "auto"), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # "encoder-service listening on HOST:PORT"
        if "listening" not in line:
            raise RuntimeError(f"server did not start: {line!r}")
        yield line.split()[-1], proc
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@contextlib.contextmanager
def serve_pool(checkpoint: str, args):
    import ray
    from ray import serve

    from encoder_service.serving.api.serve.local import deploy, free_port, load_serve_config, local_auth

    gpus = 1 if args.device == "cuda" else 0
    local_auth()  # the pool requires a bearer token: the replicas and this process's clients share it
    ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}})
    cfg = load_serve_config()
    cfg["grpc_options"]["port"], cfg["http_options"]["port"] = free_port(), free_port()
    app = cfg["applications"][0]
    app["args"].update(gpus_per_replica=gpus, cpus_per_replica=args.preprocess_workers + 1)
    app["args"]["engine"].update(checkpoint=checkpoint, device=args.device, dtype=args.dtype,
                                 max_tokens_per_request=1 << 20)
    app["args"]["pipeline"].update(preprocess_workers=args.preprocess_workers, cache_mb=0)
    app["deployments"][0]["max_ongoing_requests"] = 64
    app["deployments"][0]["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    try:
        yield deploy(cfg)
    finally:
        serve.shutdown()
        ray.shutdown()


# ------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny-5120", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--requests", type=int, default=32, help="distinct requests each client cycles through")
    p.add_argument("--images-per-request", type=int, default=2)
    p.add_argument("--preprocess-workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--paths", default="grpc,serve-grpc,serve-handle")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-"))
    checkpoint = str(preset_checkpoint(args.preset, workdir))
    requests = make_requests(args.requests, args.images_per_request)
    clients = [int(c) for c in args.clients.split(",")]
    paths = args.paths.split(",")
    engine_cfg = EngineConfig(checkpoint=checkpoint, device=args.device, dtype=args.dtype,
                              max_tokens_per_request=1 << 30, max_items_per_request=1 << 20,
                              preprocess_threads=args.preprocess_workers)
    header = {"bench": "served_throughput", "device": device_name(torch.device(args.device)), "preset": args.preset,
              "cpus": os.cpu_count(), "preprocess_workers": args.preprocess_workers, "duration_s": args.duration}
    print(json.dumps(header), flush=True)

    engine, engine_latency = engine_baseline(engine_cfg, requests, args.repeats)
    print(json.dumps({"path": "engine", **{k: round(v, 1) for k, v in engine.items()}}), flush=True)
    base = engine["packed_on_device_tiles_per_s"]
    latency = {"engine": engine_latency}
    rows = []

    def report(path: str, n: int, r: dict) -> None:
        r = {"path": path, "clients": n, **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()},
             "vs_engine_packed": round(r["tiles_per_s"] / base, 3),
             "vs_engine_e2e": round(r["tiles_per_s"] / engine["encode_e2e_tiles_per_s"], 3)}
        rows.append(r)
        print(json.dumps(r), flush=True)

    if "grpc" in paths:
        from encoder_service.client.endpoint import EncoderClient

        with standalone_server(checkpoint, args) as address:
            for n in clients:
                report("grpc", n, run_grpc_clients(address, n, requests, args.duration))
            with EncoderClient(address) as c:
                latency["grpc"] = idle_latency(lambda items: c.encode(items, copy=False), args.repeats)
    if "serve-grpc" in paths or "serve-handle" in paths:
        from encoder_service.client.endpoint import EncoderClient
        from encoder_service.client.pool import PoolClientConfig, PoolEncoderClient

        with serve_pool(checkpoint, args) as address:
            metadata = (("application", APP),)
            if "serve-grpc" in paths:
                for n in clients:
                    report("serve-grpc", n, run_grpc_clients(address, n, requests, args.duration, metadata))
                with EncoderClient(address) as c:
                    latency["serve-grpc"] = idle_latency(lambda items: c.encode(items, metadata=metadata, copy=False),
                                                         args.repeats)
            if "serve-handle" in paths:
                for n in clients:
                    report("serve-handle", n, run_handle_clients(n, requests, args.duration))
                pool = PoolEncoderClient(PoolClientConfig(application=APP, transport="handle", tenant="bench", affinity=False,
                                                          probe=False))
                latency["serve-handle"] = idle_latency(pool.encode, args.repeats)

    for path, per_image in latency.items():
        mean = statistics.mean(per_image.values())
        worst = max(per_image[k] / latency["engine"][k] for k in per_image)
        print(json.dumps({"idle_latency": path, "mean_ms": round(mean, 1),
                          "vs_engine": round(mean / statistics.mean(latency["engine"].values()), 3),
                          "worst_image_vs_engine": round(worst, 3),
                          "per_image_ms": {k: round(v, 1) for k, v in per_image.items()}}), flush=True)


if __name__ == "__main__":
    main()
