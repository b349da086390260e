"""Preprocessing on the GPU (`preprocess_device=cuda`) vs the CPU path, in-process and served (issue 19).

Side by side in one run, same checkpoint, same requests (2 serving-mix JPEGs each):
- engine: the ViT's packed tiles/s on preprocessed tiles, output left on the device (the denominator);
  the device tiling's GPU time against the forward's for the same tiles; in-process `encode` end to
  end, request by request, with each path; and the in-process pipeline (`EncodePipeline`, worker
  processes, 8 requests in flight) with each path;
- served gRPC (the standalone server with 8 preprocessing worker processes), for each path and for N = 1,
  2, 4, 8 preprocessing cores: the workers pinned to N cores, the server's other processes and the
  client processes to the remaining cores. Reported: tiles/s and its ratio to the engine, CPU-seconds
  per 1000 tiles of the preprocessing workers and of the whole server (from /proc, over the measured
  window), GPU % busy (nvidia-smi);
- idle latency of 1-image requests (each image of the mix) through gRPC and in-process, each path.

    python -m bench.preprocess --preset radio-h --device cuda --clients 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import wait
from pathlib import Path

import torch

from bench.common import device_name, interleaved_medians, preset_checkpoint
from bench.served_throughput import as_items, idle_latency, make_requests, run_grpc_clients, standalone_server
from encoder_service.config import PRESETS, EngineConfig
from encoder_service.engine import EncoderEngine
from encoder_service.preprocess import device as preprocess_device
from encoder_service.serving.host.pipeline import EncodePipeline, PipelineConfig

WORKER_MODULE = "encoder_service.serving.host.preprocess"
TICK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ processes, cores, CPU time (/proc)


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                out += kids
                todo += kids
        except FileNotFoundError:
            continue
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def server_processes() -> tuple[list[int], list[int]]:
    """(preprocessing workers, the server's other processes) among this bench's descendants."""
    workers, server = [], []
    for pid in descendants(os.getpid()):
        line = cmdline(pid)
        if WORKER_MODULE in line:
            workers.append(pid)
        elif "encoder_service" in line and "multiprocessing" not in line:
            server.append(pid)
    return workers, server


def pin(pids: list[int], cores: set[int]) -> None:
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), cores)
            except (ProcessLookupError, FileNotFoundError):
                pass


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except FileNotFoundError:
            pass
    return total / TICK


class WindowCPU:
    """CPU-seconds of the workers and of the whole server inside the clients' measured window."""

    def __init__(self, workers: list[int], server: list[int]):
        self.workers, self.server = workers, server
        self.samples: list[tuple[float, float]] = []
        self._thread: threading.Thread | None = None

    def __call__(self, start_at: float, end_at: float) -> None:
        def sample() -> None:
            for at in (start_at, end_at):
                time.sleep(max(0.0, at - time.time()))
                self.samples.append((cpu_seconds(self.workers), cpu_seconds(self.workers + self.server)))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def result(self) -> tuple[float, float]:
        self._thread.join()
        (w0, s0), (w1, s1) = self.samples
        return w1 - w0, s1 - s0


# ------------------------------------------------------------------ in-process


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn` (device work included), after one warm-up run."""
    return interleaved_medians({"run": fn}, repeats, warmup=1)["run"]


def in_process(cfg: EngineConfig, requests, args) -> tuple[dict, dict]:
    engine = EncoderEngine(cfg)
    device = engine.device
    tiler = preprocess_device.DeviceTiler(engine.preprocessor.cfg, device)
    items = [item for jpegs in requests for item in as_items(jpegs)]
    processed = engine.prepare(items)  # the CPU path's tiles
    tiles = sum(p.num_tiles for p in processed)
    forward_s = timed(lambda: engine.run(processed, output_device=str(device)), args.repeats)
    plans = [engine.planner.plan(item) for item in items]
    decoded = [(preprocess_device.host_decoded(engine.preprocessor, item, plan, device), plan)
               for item, plan in zip(items, plans)]
    tiling_s = timed(lambda: [tiler.pieces(image, plan) for image, plan in decoded], args.repeats)
    result = {"tiles": tiles, "packed_tiles_per_s": tiles / forward_s,
              "device_tiling_ms_per_tile": 1e3 * tiling_s / tiles,
              "device_tiling_share_of_gpu_time": tiling_s / (tiling_s + forward_s)}
    latency = {}
    for mode, chosen in (("cpu", None), ("cuda", tiler)):
        engine.device_tiler = chosen
        encode_s = timed(lambda: [engine.encode(as_items(jpegs)) for jpegs in requests], 1)
        result[f"encode_e2e_{mode}_tiles_per_s"] = tiles / encode_s
        latency[f"engine-{mode}"] = idle_latency(engine.encode, args.repeats)
        for workers in [int(w) for w in args.pipeline_workers.split(",")]:
            pipeline = EncodePipeline(engine, PipelineConfig(preprocess_workers=workers, cache_mb=0))
            try:
                def flood() -> None:
                    pending = []
                    for jpegs in requests:
                        if len(pending) >= 8:
                            done, rest = wait(pending, return_when="FIRST_COMPLETED")
                            pending = list(rest)
                        pending.append(pipeline.encode(as_items(jpegs)))
                    wait(pending)
                pipeline_s = timed(flood, 2)
            finally:
                pipeline.close()
            result[f"pipeline_{workers}w_{mode}_tiles_per_s"] = tiles / pipeline_s
    return result, latency  # the engine goes with this frame: the server gets the GPU's memory


# ------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny-5120", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--modes", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cores", default="1,2,4,8", help="preprocessing cores of each served window")
    p.add_argument("--workers", type=int, default=8, help="preprocessing worker processes of the server")
    p.add_argument("--pipeline-workers", default="2", help="worker processes of the in-process pipeline runs")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--requests", type=int, default=32, help="distinct requests each client cycles through")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-"))
    checkpoint = str(preset_checkpoint(args.preset, workdir))
    requests = make_requests(args.requests, 2)
    all_cores = sorted(os.sched_getaffinity(0))
    began = time.time()
    print(json.dumps({"bench": "preprocess", "device": device_name(torch.device(args.device)), "preset": args.preset,
                      "cpus": len(all_cores), "workers": args.workers, "clients": args.clients,
                      "duration_s": args.duration}), flush=True)
    cfg = EngineConfig(checkpoint=checkpoint, device=args.device, dtype=args.dtype, max_tokens_per_request=1 << 30,
                       max_items_per_request=1 << 20, preprocess_device="cpu")
    engine, latency = in_process(cfg, requests, args)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(json.dumps({"path": "engine", "at_s": round(time.time() - began), **{k: round(v, 4 if "share" in k else 1) for k, v in engine.items()}}),
          flush=True)
    base = engine["packed_tiles_per_s"]

    from encoder_service.client.endpoint import EncoderClient

    for mode in args.modes.split(","):
        args.preprocess_device, args.preprocess_workers = mode, args.workers
        with standalone_server(checkpoint, args) as address:
            workers, server = server_processes()
            for n in [int(c) for c in args.cores.split(",")]:
                prep, rest = set(all_cores[:n]), set(all_cores[n:]) or set(all_cores)
                pin(workers, prep)
                pin(server, rest)
                os.sched_setaffinity(0, rest)  # the client processes inherit it
                probe = WindowCPU(workers, server)
                r = run_grpc_clients(address, args.clients, requests, args.duration, on_window=probe)
                worker_s, server_s = probe.result()
                kilo_tiles = r["tiles_per_s"] * args.duration / 1000
                print(json.dumps({"path": "grpc", "preprocess": mode, "cores": n, "at_s": round(time.time() - began), "tiles_per_s": round(r["tiles_per_s"], 1),
                                  "vs_engine_packed": round(r["tiles_per_s"] / base, 3),
                                  "worker_cpu_s_per_1000_tiles": round(worker_s / kilo_tiles, 3),
                                  "server_cpu_s_per_1000_tiles": round(server_s / kilo_tiles, 3),
                                  "p50_ms": round(r["p50_ms"], 1), "gpu_util": r["gpu_util"]}), flush=True)
            pin(workers, set(all_cores))
            pin(server, set(all_cores))
            os.sched_setaffinity(0, set(all_cores))
            with EncoderClient(address) as c:
                latency[f"grpc-{mode}"] = idle_latency(lambda items: c.encode(items, copy=False), args.repeats)
    reference = statistics.mean(latency["engine-cpu"].values())
    for path, per_image in latency.items():
        mean = statistics.mean(per_image.values())
        print(json.dumps({"idle_latency": path, "mean_ms": round(mean, 1), "vs_engine_cpu": round(mean / reference, 3),
                          "per_image_ms": {k: round(v, 1) for k, v in per_image.items()}}), flush=True)


if __name__ == "__main__":
    main()
