"""Checks deploy/grafana/encoder-service.json against a real Prometheus: every panel's query returns data.

Starts a standalone encoder server (its /metrics) and a one-replica Ray Serve pool (Ray's metrics agent
exports the replicas' metrics), drives traffic through both (new images, repeats for cache hits), has a
Prometheus server (Debian's `prometheus` package: `apt-get install prometheus`) scrape them every second,
then runs every panel's query through Prometheus's HTTP API. Panels described "gpu-only" are reported,
not required, on a machine without a GPU. With `--vllm`, the vLLM-consumer panels too: vLLM's OpenAI server
(the environment of scripts/vllm_env.sh) with the pool's middleware and connector, fed by a pool of its own
serving the tiny InternVL, takes chats (images sent again, one request vLLM re-hashes, and chats after
that pool is stopped: fallbacks); without it those panels are reported, not required. Exit code 1 if any
other query comes back empty.

    python scripts/check_dashboard.py [--vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encoder_service.client.endpoint import EncoderClient  # noqa: E402
from encoder_service.contract.media import MediaInput, Modality  # noqa: E402
from encoder_service.serving.api.serve.local import cpu_pool_config, deploy, free_port, local_auth  # noqa: E402
from encoder_service.serving.api.server import BackgroundServer, ServerConfig  # noqa: E402
from encoder_service.serving.host.pipeline import PipelineConfig  # noqa: E402
from tests.conftest import image_bytes  # noqa: E402

DASHBOARD = ROOT / "deploy" / "grafana" / "encoder-service.json"


def traffic(address: str, metadata=None, seconds: float = 20.0) -> None:
    rng = np.random.default_rng()
    repeated = [MediaInput(Modality.IMAGE, image_bytes(320, 240, seed=int(rng.integers(1 << 30)))) for _ in range(4)]
    end = time.monotonic() + seconds
    with EncoderClient(address, timeout=60) as client:
        while time.monotonic() < end:
            fresh = MediaInput(Modality.IMAGE, image_bytes(int(rng.integers(64, 700)), int(rng.integers(64, 700)),
                                                           seed=int(rng.integers(1 << 30))))
            client.encode([fresh, repeated[int(rng.integers(4))]], metadata=metadata)


def query(prometheus: str, expr: str) -> list:
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def vllm_consumer(work: Path, stack: list) -> tuple[str, callable]:
    """vLLM with the middleware and the connector, its own pool; its metrics address and the traffic to
    drive (which ends with that pool stopped)."""
    from encoder_service.config import EngineConfig
    from encoder_service.integrations.vllm.launch import (consumer_config, frontend_config, start_vllm_server,
                                                          stop, wait_http, write_binding_key)
    from encoder_service.integrations.vllm.openai import chat_messages, post_json
    from encoder_service.integrations.vllm.tiny_model import build
    from PIL import Image

    subprocess.run([str(ROOT / "scripts" / "vllm_env.sh")], cwd=ROOT, check=True)
    model = build(work / "vlm")
    pool = BackgroundServer(ServerConfig(port=0, engine=EngineConfig(checkpoint=str(model), device="cpu"),
                                         pipeline=PipelineConfig(preprocess_workers=1, arena_mb=32, cache_mb=32)))
    pool.start()
    running = [True]

    def stop_pool() -> None:
        if running.pop() if running else False:
            pool.stop()

    stack.append(stop_pool)
    key = write_binding_key(work / "binding-key")
    port = free_port()
    server = start_vllm_server(str(ROOT / ".venv-vllm" / "bin" / "python"), model, port,
                               consumer_config(pool.address, binding_key_file=str(key)), work / "vllm.log",
                               "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
                               middleware=frontend_config(work / "frontend.json", [pool.address],
                                                          binding_key_file=str(key)))
    stack.append(lambda: stop(server))
    wait_http(f"http://127.0.0.1:{port}/health", server, work / "vllm.log")
    rng = np.random.default_rng()

    def image(name: str) -> Path:
        path = work / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (int(rng.integers(64, 400)), int(rng.integers(64, 400)), 3),
                                     dtype=np.uint8)).save(path)
        return path

    images = [image(f"image{i}") for i in range(4)]

    def chats(seconds: float) -> None:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for turn in ([images[0]], [images[0], images[1]], [images[2]]):  # images sent again, new ones
                post_json(url, {"model": str(model), "messages": chat_messages(turn), "max_tokens": 4})
            post_json(url, {"model": str(model), "messages": chat_messages([images[3]]), "max_tokens": 4,
                            "mm_processor_kwargs": {}})  # vLLM re-hashes this one: bypassed
            images.append(images.pop(2))  # another image new to this round
        stop_pool()  # the pool gone: vLLM encodes for itself (fallbacks)
        for name in ("after0", "after1"):  # new images: nothing of them in vLLM's caches
            post_json(url, {"model": str(model), "messages": chat_messages([image(name)]), "max_tokens": 4})

    return f"127.0.0.1:{port}", chats


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--traffic-seconds", type=float, default=25.0)
    p.add_argument("--vllm", action="store_true", help="also check the vLLM-consumer panels (runs vLLM on the CPU)")
    args = p.parse_args()
    if shutil.which("prometheus") is None:
        print("prometheus is not installed (Debian: apt-get install prometheus)", file=sys.stderr)
        return 2
    import ray

    local_auth()  # both pools require a bearer token: the servers and this process's clients share it
    work = Path(tempfile.mkdtemp(prefix="dashboard-check-"))
    ray_metrics_port, prom_port = free_port(), free_port()
    server = BackgroundServer(ServerConfig(port=0, metrics_port=0, pipeline=PipelineConfig(
        preprocess_workers=1, arena_mb=64, cache_mb=64)))
    server.start()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=ray_metrics_port)
    prometheus = None
    stack: list = []
    try:
        vllm_target, vllm_traffic = vllm_consumer(work, stack) if args.vllm else (None, None)
        pool = deploy(cpu_pool_config(replicas=1, cache_mb=64, arena_mb=64))
        targets = [f"127.0.0.1:{server.server.metrics_port}", f"127.0.0.1:{ray_metrics_port}",
                   *([vllm_target] if vllm_target else [])]
        (work / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"scrape_configs: [{{job_name: encoder, static_configs: [{{targets: {json.dumps(targets)}}}]}}]\n")
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=open(work / "prometheus.log", "w"),
            stderr=subprocess.STDOUT)
        traffic(server.address, None, args.traffic_seconds / 2)
        traffic(pool, (("application", "encoder"),), args.traffic_seconds / 2)
        if vllm_traffic is not None:
            vllm_traffic(args.traffic_seconds / 2)
        time.sleep(12)  # Ray's agent exports every few seconds; rate() needs two scrapes of each
        dashboard = json.loads(DASHBOARD.read_text())
        missing, gpu_only = [], []
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                result = query(f"http://127.0.0.1:{prom_port}", target["expr"])
                state = "data" if result else "EMPTY"
                if not result and "gpu-only" in panel.get("description", ""):
                    state = "empty (gpu-only panel, no GPU here)"
                    gpu_only.append(panel["title"])
                elif not result and "vllm-consumer" in panel.get("description", "") and not args.vllm:
                    state = "not checked (run with --vllm)"
                elif not result:
                    missing.append(f"{panel['title']}: {target['expr']}")
                print(f"{state:>36}  {panel['title']} [{target['legendFormat']}]")
        print(f"{sum(len(p['targets']) for p in dashboard['panels'])} queries, {len(missing)} empty"
              + (f", {len(gpu_only)} gpu-only panel(s) without a GPU" if gpu_only else ""))
        for line in missing:
            print("EMPTY:", line, file=sys.stderr)
        return 1 if missing else 0
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        for undo in reversed(stack):
            undo()
        ray.shutdown()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    sys.exit(main())
