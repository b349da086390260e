"""Checks deploy/grafana/encoder-service.json against a real Prometheus: every panel's query returns data.

Starts a standalone encoder server (its /metrics) and a one-replica Ray Serve pool (Ray's metrics agent
exports the replicas' metrics), drives traffic through both (new images, repeats for cache hits), has a
Prometheus server (Debian's `prometheus` package: `apt-get install prometheus`) scrape them every second,
then runs every panel's query through Prometheus's HTTP API. Panels described "gpu-only" are reported,
not required, on a machine without a GPU. Exit code 1 if any other query comes back empty.

    python scripts/check_dashboard.py [--keep-seconds 0]
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
from encoder_service.serving.api.serve.local import deploy, free_port, load_serve_config, local_auth  # noqa: E402
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


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--traffic-seconds", type=float, default=25.0)
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
    try:
        cfg = load_serve_config()
        cfg["grpc_options"]["port"], cfg["http_options"]["port"] = free_port(), free_port()
        cfg["applications"][0]["args"].update(gpus_per_replica=0)
        cfg["applications"][0]["args"]["pipeline"].update(preprocess_workers=1, arena_mb=64, cache_mb=64)
        cfg["applications"][0]["deployments"][0]["autoscaling_config"].update(min_replicas=1, max_replicas=1)
        pool = deploy(cfg)
        targets = [f"127.0.0.1:{server.server.metrics_port}", f"127.0.0.1:{ray_metrics_port}"]
        (work / "prometheus.yml").write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"scrape_configs: [{{job_name: encoder, static_configs: [{{targets: {json.dumps(targets)}}}]}}]\n")
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=open(work / "prometheus.log", "w"),
            stderr=subprocess.STDOUT)
        traffic(server.address, None, args.traffic_seconds / 2)
        traffic(pool, (("application", "encoder"),), args.traffic_seconds / 2)
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
        ray.shutdown()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    sys.exit(main())
