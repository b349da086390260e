"""vLLM alone against vLLM fed by the encoder pool (EPD), on multi-turn image chat traces, side by side.

Every path serves the tiny random InternVL (encoder_service.integrations.vllm.tiny_model) through vLLM's
OpenAI server on the CPU, in the vLLM environment of scripts/vllm_env.sh:
  alone       vLLM runs its own vision encoder for every image it has not cached;
  middleware  the documented path: the pool's ASGI middleware inside vLLM's API server binds each image and
              uploads it to a standalone pool (cache-only, beside the request); vLLM's connector fetches the
              rows by digest; vLLM's vision encoder does not run;
  frontend    the same work in a separate front end (one more HTTP hop), to judge the middleware against;
  nixl        the middleware path with rows by reference: vLLM's workers read them from the pool's memory
              with NIXL (no staging file, no rows through the engine-core process);
  replicas    the middleware on a Ray Serve pool of 3 replicas with auth; one replica is killed a third of
              the way into the 4-client trace (Serve replaces it);
  pool-down   the middleware path whose pool is killed a third of the way into the trace: vLLM's own
              encoder takes over (local fallback); reported: failures and the slowest request after the kill.
The servers of alone/middleware/frontend run at once and the traces are interleaved (path by path, for each
repeat and client count), each repeat a fresh set of images so that no cache carries over between repeats;
replicas and pool-down run after, with vLLM alone measured again beside them.

Cores: a deployed pool runs on machines of its own. Here it shares the host, so by default every vLLM server
is pinned to `--vllm-cpus` and the pool, the separate front end and this client to `--pool-cpus` (with 2
cores: one each): vLLM's work, the middleware's included, is measured on vLLM's core, and the pool's
encoding does not compete with it (vLLM's CPU workers spin while they wait for work, which starves a pool
beside them). `--vllm-cpus "" --pool-cpus ""` runs everything unpinned.

Reported per path and client count: TTFT p50/p99 measured by the client, requests/s, the ratio of both to
vLLM alone in the same round, and TTFT split into its parts from the servers' own metrics (means per
request): `frontend_ms` (the rewrite on the request's path: media decoded, bound), `upload_ms` (the
cache-only upload, beside the path), `connector_wait_ms` (a request waiting in vLLM's scheduler for its
rows), `vllm_ttft_ms` (vLLM's own time to first token, from its arrival in vLLM; includes the wait).

What a tiny CPU model can and cannot show: its vision tower is a 2-layer ViT of width 64, so encoding costs
vLLM almost nothing and this bench measures the integration's overhead, not EPD's benefit (which needs a
vision encoder that costs real GPU time).

    python -m bench.vllm_epd [--conversations 12 --turns 4 --clients 1,4 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import tree_cpu_s
from bench.served_throughput import percentile
from encoder_service.integrations.vllm.launch import (consumer_config, frontend_config, start_frontend,
                                                      start_vllm_server, stop, wait_http, write_binding_key)
from encoder_service.integrations.vllm.openai import chat_messages
from encoder_service.integrations.vllm.tiny_model import build
from encoder_service.serving.api.serve.local import free_port, local_auth

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(640, 480), (500, 375), (300, 300), (800, 600), (200, 400)]
VLLM_FLAGS = ("--dtype", "float32", "--max-model-len", "4096", "--enforce-eager", "--limit-mm-per-prompt",
              json.dumps({"image": 4}))
APPLICATION = "encoder"
# vLLM's CPU engine and workers spin (sched_yield) for 1 s after their last message before they sleep: a
# path measured right after another shares the core with the other's spinning. Each waits this long first.
SETTLE_S = 2.0
UCX_SAME_NODE = "cma,tcp,self"  # NIXL between processes of one machine
# Histograms whose (sum, count) deltas give the TTFT split; counters reported as deltas.
SPLIT = {"frontend_ms": "encoder_pool_frontend_seconds", "upload_ms": "encoder_pool_frontend_upload_seconds",
         "connector_wait_ms": "vllm:encoder_pool_request_wait_seconds",
         "vllm_ttft_ms": "vllm:time_to_first_token_seconds"}
COUNTERS = {"fetches": "vllm:encoder_pool_fetches_total", "fallbacks": "vllm:encoder_pool_fallbacks_total",
            "prefix_cached_items": "vllm:encoder_pool_prefix_cached_items_total"}


def make_trace(conversations: int, turns: int, workdir: Path, seed: int) -> list[list[list[str]]]:
    """Conversations of `turns` turns, each turn re-sending the conversation's images (1-3 to start,
    sometimes one more): fresh random images for every seed."""
    workdir.mkdir(parents=True, exist_ok=True)
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


def stream_ttft(url: str, body: bytes, headers: dict, timeout_s: float = 120.0) -> float:
    """Seconds to the first server-sent event of a streamed completion; the rest is read to the end."""
    started = time.perf_counter()
    first = None
    request = urllib.request.Request(url, body, {"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        for line in response:
            if first is None and line.startswith(b"data: "):
                first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("no event in the stream")
    return first


def replay(url: str, model: str, trace, clients: int, max_tokens: int, key: str,
           on_progress=None) -> dict:
    """The trace through `url` with `clients` conversations at once; each record: start, ttft, end, error."""
    bodies = [[json.dumps({"model": model, "messages": chat_messages(images), "max_tokens": max_tokens,
                           "temperature": 0.0, "ignore_eos": True, "stream": True}).encode() for images in turns]
              for turns in trace]
    headers = {"Authorization": f"Bearer {key}"}
    records, lock = [], threading.Lock()

    def conversation(turns: list[bytes]) -> None:
        for body in turns:
            started = time.perf_counter()
            record = {"start": started}
            try:
                record["ttft"] = stream_ttft(url, body, headers)
            except Exception as e:  # noqa: BLE001 - a failed request is counted, not raised
                record["error"] = repr(e)[:200]
            record["end"] = time.perf_counter()
            with lock:
                records.append(record)
                if on_progress is not None:
                    on_progress(len(records))

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(conversation, bodies))
    return {"records": records, "wall_s": time.perf_counter() - started}


def summarize(run: dict) -> dict:
    ok = [r for r in run["records"] if "error" not in r]
    ttft = [r["ttft"] for r in ok]
    return {"requests": len(run["records"]), "failed": len(run["records"]) - len(ok),
            "ttft_p50_ms": round(1e3 * statistics.median(ttft), 1) if ttft else None,
            "ttft_p99_ms": round(1e3 * percentile(ttft, 0.99), 1) if ttft else None,
            "requests_per_s": round(len(ok) / run["wall_s"], 2)}


def scrape(url: str) -> dict[str, float]:
    """A Prometheus text page as {sample name with labels: value} (label sets summed per metric name too)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            samples[name] = samples.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return samples


def split(before: dict, after: dict) -> dict:
    out = {}
    for key, metric in SPLIT.items():
        total = after.get(metric + "_sum", 0.0) - before.get(metric + "_sum", 0.0)
        count = after.get(metric + "_count", 0.0) - before.get(metric + "_count", 0.0)
        if count:
            out[key] = round(1e3 * total / count, 1)
    for key, metric in COUNTERS.items():
        if metric in after:
            out[key] = int(after[metric] - before.get(metric, 0.0))
    return out


@dataclass
class Route:
    name: str
    chat_url: str
    metrics: list[str] = field(default_factory=list)  # Prometheus pages whose deltas split TTFT
    servers: dict[str, int] = field(default_factory=dict)  # what runs it: name -> root pid (CPU per request)

    def measure(self, model: str, trace, clients: int, max_tokens: int, key: str, **kw) -> dict:
        before, cpu = _merged(self.metrics), {name: tree_cpu_s(pid) for name, pid in self.servers.items()}
        run = replay(self.chat_url, model, trace, clients, max_tokens, key, **kw)
        row = {"path": self.name, "clients": clients, **summarize(run)}
        row.update(split(before, _merged(self.metrics)))
        for name, pid in self.servers.items():  # vLLM's includes its workers' spinning while they wait for work
            row[f"{name}_cpu_ms_per_request"] = round(1e3 * (tree_cpu_s(pid) - cpu[name]) / row["requests"], 1)
        row["_run"] = run
        return row


def _merged(urls: list[str]) -> dict:
    out: dict[str, float] = {}
    for url in urls:
        for name, value in scrape(url).items():
            out[name] = out.get(name, 0.0) + value
    return out


def start_pool(model: str, workdir: Path, name: str, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """A standalone pool (the token from $ENCODER_SERVICE_TOKEN) on loopback, on this process's cores; its
    address."""
    port = free_port()
    log = open(workdir / f"{name}.log", "w")
    pool = subprocess.Popen([sys.executable, "-m", "encoder_service.cli", "serve", "--port", str(port),
                             "--checkpoint", model, "--device", "cpu", "--cache-mb", "256",
                             "--preprocess-workers", "1", *extra], stdout=subprocess.PIPE, stderr=log, text=True)
    line = pool.stdout.readline()
    if "listening" not in line:
        raise RuntimeError(f"the pool did not start: {line}{(workdir / f'{name}.log').read_text()[-3000:]}")
    return pool, f"127.0.0.1:{port}"


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's TTFT p50 and req/s over vLLM alone's in the same round."""
    base = next(r for r in rows if r["path"] == "vllm-alone")
    for row in rows:
        if row is not base and row["ttft_p50_ms"] and base["ttft_p50_ms"]:
            row["ttft_p50_x_alone"] = round(row["ttft_p50_ms"] / base["ttft_p50_ms"], 2)
            row["req_s_x_alone"] = round(row["requests_per_s"] / base["requests_per_s"], 2)
    return rows


def emit(row: dict, out) -> None:
    row = {k: v for k, v in row.items() if not k.startswith("_")}
    print(json.dumps(row), flush=True)
    if out is not None:
        out.write(json.dumps(row) + "\n")
        out.flush()


def warm(paths: list[Route], model: str, workdir: Path, key: str) -> None:
    trace = make_trace(2, 2, workdir / "warm", seed=999)
    for path in paths:
        replay(path.chat_url, model, trace, 2, 4, key)


def cpu_set(text: str) -> set[int] | None:
    return {int(c) for c in text.split(",")} if text else None


@dataclass
class Bench:
    """What every path is started with."""

    python: str  # the vLLM environment's
    model: str
    workdir: Path
    binding_key: Path
    env: dict  # for vLLM and the front end: the pool's token
    vllm_cpus: set[int] | None
    args: argparse.Namespace
    user: str = "bench-user-key"
    procs: list[subprocess.Popen] = field(default_factory=list)

    def vllm(self, name: str, connector: dict | None = None, middleware: Path | None = None) -> tuple[int, Route]:
        port = free_port()
        log = self.workdir / f"{name}.log"
        server = start_vllm_server(self.python, self.model, port, connector, log, *VLLM_FLAGS, middleware=middleware,
                                   env=self.env, cpus=self.vllm_cpus)
        self.procs.append(server)
        wait_http(f"http://127.0.0.1:{port}/health", server, log)
        return port, Route(name, f"http://127.0.0.1:{port}/v1/chat/completions", [f"http://127.0.0.1:{port}/metrics"],
                           {"vllm": server.pid})

    def pool(self, name: str, nixl: bool = False) -> tuple[subprocess.Popen, str]:
        extra = ("--nixl", "--ucx-transports", UCX_SAME_NODE) if nixl else ()
        pool, address = start_pool(self.model, self.workdir, name, extra)
        self.procs.append(pool)
        return pool, address

    def middleware_path(self, name: str, address: str, application: str = "", transfer: str = "bytes") -> Route:
        middleware = frontend_config(self.workdir / f"{name}.json", [address], application=application,
                                     binding_key_file=str(self.binding_key))
        connector = consumer_config(address, application=application, binding_key_file=str(self.binding_key),
                                    **({"transfer": "nixl", "ucx_transports": UCX_SAME_NODE} if transfer == "nixl"
                                       else {}))
        return self.vllm(name, connector, middleware)[1]

    def frontend_path(self, address: str) -> Route:
        port, vllm_path = self.vllm("frontend-vllm", consumer_config(address, binding_key_file=str(self.binding_key)))
        front_port = free_port()
        front = start_frontend(self.python, address, f"http://127.0.0.1:{port}", front_port,
                               self.workdir / "frontend.log", binding_key_file=str(self.binding_key), env=self.env)
        self.procs.append(front)
        wait_http(f"http://127.0.0.1:{front_port}/health", front, self.workdir / "frontend.log")
        return Route("frontend", f"http://127.0.0.1:{front_port}/v1/chat/completions",
                     [*vllm_path.metrics, f"http://127.0.0.1:{front_port}/frontend/metrics"],
                     {**vllm_path.servers, "frontend": front.pid})

    def trace(self, name: str, seed: int):
        return make_trace(self.args.conversations, self.args.turns, self.workdir / name, seed)

    def measure(self, path: Route, trace, clients: int, **kw) -> dict:
        time.sleep(SETTLE_S)
        return path.measure(self.model, trace, clients, self.args.max_tokens, self.user, **kw)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--conversations", type=int, default=12)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--clients", default="1,4")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--paths", default="alone,middleware,frontend,nixl,replicas,pool-down")
    p.add_argument("--vllm-cpus", default="0", help="cores for every vLLM server (\"\": not pinned)")
    p.add_argument("--pool-cpus", default="1", help="cores for pools, the front end and this client")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None, help="also write the rows here (JSON lines)")
    args = p.parse_args()
    wanted = set(args.paths.split(","))
    clients = [int(c) for c in args.clients.split(",")]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-epd-"))
    subprocess.run([str(ROOT / "scripts" / "vllm_env.sh")], cwd=ROOT, check=True)
    if cpu_set(args.pool_cpus):
        os.sched_setaffinity(0, cpu_set(args.pool_cpus))  # pools, Ray and the front end start from here
    token = local_auth()  # every pool here requires a bearer token, as deployed
    bench = Bench(str(ROOT / ".venv-vllm" / "bin" / "python"), str(build(workdir / "model")), workdir,
                  write_binding_key(workdir / "binding-key"), {"ENCODER_SERVICE_TOKEN": token},
                  cpu_set(args.vllm_cpus), args)
    out = open(args.out, "w") if args.out else None
    emit({"bench": "vllm_epd", "model": "tiny InternVL (vision 2x64, LLM 2x128)", "device": "CPU",
          "cpus": os.cpu_count(), "vllm_cpus": args.vllm_cpus, "pool_cpus": args.pool_cpus,
          "conversations": args.conversations, "turns": args.turns, "max_tokens": args.max_tokens,
          "repeats": args.repeats}, out)
    try:
        alone = bench.vllm("vllm-alone")[1]
        paths = [alone]
        if "middleware" in wanted:
            paths.append(bench.middleware_path("middleware", bench.pool("middleware-pool")[1]))
        if "frontend" in wanted:
            paths.append(bench.frontend_path(bench.pool("frontend-pool")[1]))
        if "nixl" in wanted:  # the middleware path, rows read by vLLM's workers with NIXL
            paths.append(bench.middleware_path("middleware-nixl", bench.pool("nixl-pool", nixl=True)[1],
                                               transfer="nixl"))
        warm(paths, bench.model, workdir, bench.user)
        for repeat in range(args.repeats):
            for n in clients:
                trace = bench.trace(f"trace{repeat}-{n}", seed=repeat * 100 + n)
                order = paths if repeat % 2 == 0 else paths[::-1]  # neither goes first every time
                rows = {path.name: bench.measure(path, trace, n) for path in order}
                for row in with_ratios([rows[path.name] for path in paths]):
                    emit({"round": repeat, **row}, out)
        if "replicas" in wanted:
            replicas(bench, alone, clients, out)
        if "pool-down" in wanted:
            pool_down(bench, alone, out)
    finally:
        stop(*[p for p in bench.procs if p.poll() is None])
        if out is not None:
            out.close()


def replicas(bench: Bench, alone: Route, clients: list[int], out) -> None:
    """The middleware on a 3-replica Ray Serve pool; one replica killed a third into the first round's
    trace of the most clients (Serve starts another)."""
    import ray
    from ray import serve

    from encoder_service.serving.api.serve.local import cpu_pool_config, deploy, running_replicas

    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    try:
        address = deploy(cpu_pool_config(bench.model, replicas=3, cache_mb=64, dtype="float32"))
        deadline = time.monotonic() + 180
        while running_replicas(APPLICATION) < 3 and time.monotonic() < deadline:
            time.sleep(1)
        path = bench.middleware_path("replicas-3", address, APPLICATION)
        warm([path], bench.model, bench.workdir, bench.user)
        for repeat in range(bench.args.repeats):
            for n in clients:
                trace = bench.trace(f"rtrace{repeat}-{n}", seed=5000 + repeat * 100 + n)
                total = sum(len(c) for c in trace)
                killed: list[float] = []

                def kill_one(done: int) -> None:
                    if n == max(clients) and repeat == 0 and not killed and done >= total // 3:
                        killed.append(time.perf_counter())
                        victim = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                                      if a["namespace"] == "serve" and "EncoderDeployment" in a["name"])
                        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)

                rows = [bench.measure(alone, trace, n), bench.measure(path, trace, n, on_progress=kill_one)]
                if killed:
                    rows[1]["replica_killed_mid_trace"] = True
                for row in with_ratios(rows):
                    emit({"round": repeat, **row}, out)
    finally:
        stop(*[p for p in bench.procs if p.poll() is None and "replicas-3" in str(p.args)])
        serve.shutdown()
        ray.shutdown()


def pool_down(bench: Bench, alone: Route, out) -> None:
    """The middleware path whose pool is SIGKILLed a third of the way into a 4-client trace: what each
    request that ends after the kill spent past it (from the kill, or from its own start)."""
    pool, address = bench.pool("down-pool")
    path = bench.middleware_path("pool-down", address)
    warm([path], bench.model, bench.workdir, bench.user)
    trace = bench.trace("down-trace", seed=9000)
    total = sum(len(c) for c in trace)
    killed: list[float] = []

    def kill_pool(done: int) -> None:
        if not killed and done >= total // 3:
            killed.append(time.perf_counter())
            pool.send_signal(signal.SIGKILL)

    row = bench.measure(path, trace, 4, on_progress=kill_pool)
    after = [r for r in row["_run"]["records"] if r["end"] > killed[0]]
    row["requests_after_kill"] = len(after)
    row["slowest_after_kill_ms"] = round(1e3 * max(r["end"] - max(r["start"], killed[0]) for r in after), 1)
    for r in with_ratios([bench.measure(alone, trace, 4), row]):
        emit(r, out)


if __name__ == "__main__":
    main()
