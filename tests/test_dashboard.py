"""The Grafana dashboard names only metrics the service exports (a live server's /metrics; the Serve
replicas' `ray_` metrics; the vLLM consumer's panels are checked against a live vLLM in tests/test_vllm.py).
That every query returns data is checked against a real Prometheus by scripts/check_dashboard.py (Debian's
prometheus package)."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

from encoder_service.client.endpoint import EncoderClient
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.serving.api.server import BackgroundServer, ServerConfig
from encoder_service.serving.host.pipeline import PipelineConfig
from tests.conftest import image_bytes

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "encoder-service.json"
# What RayEncoderMetrics defines (ray.util.metrics; Ray's exporter adds the `ray_` prefix and `_total`).
RAY_METRICS = {"encoder_requests", "encoder_request_seconds", "encoder_stage_seconds", "encoder_tokens_out",
               "encoder_bytes_out"}


def _family(name: str) -> str:
    return re.sub(r"_(total|bucket|count|sum)$", "", name)


def test_every_panel_names_metrics_the_service_exports(engine_config):
    dashboard = json.loads(DASHBOARD.read_text())
    cfg = ServerConfig(port=0, metrics_port=0, engine=engine_config,
                       pipeline=PipelineConfig(preprocess_workers=1, arena_mb=16, cache_mb=16))
    with BackgroundServer(cfg) as server, EncoderClient(server.address) as client:
        client.encode([MediaInput(Modality.IMAGE, image_bytes(100, 80))])
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics") as response:
            text = response.read().decode()
    exported = {_family(name) for name in re.findall(r"^# TYPE (\w+) ", text, re.M)}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\b((?:ray_)?encoder_\w+)", target["expr"]):
                if name.startswith("ray_"):
                    assert _family(name[4:]) in RAY_METRICS, (panel["title"], name)
                elif "gpu-only" not in panel["description"] and "vllm-consumer" not in panel["description"]:
                    assert _family(name) in exported, (panel["title"], name, sorted(exported))
    assert len(dashboard["panels"]) >= 15 and all(p["targets"] for p in dashboard["panels"])
