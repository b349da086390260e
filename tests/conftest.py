"""Shared fixtures: a tiny random checkpoint loaded through the real loader, a real gRPC server."""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import subprocess
import time
from pathlib import Path

# A Serve handle router left in this process after its cluster shut down must not start a new Ray
# instance behind the next test's back (Ray connects automatically on any call otherwise).
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

import numpy as np
import pytest
from PIL import Image

from encoder_service.config import EngineConfig
from encoder_service.engine import EncoderEngine
from encoder_service.models import tiny_checkpoint_dir

ROOT = Path(__file__).resolve().parents[1]


def wait_for(predicate, timeout_s: float, interval_s: float = 0.25) -> bool:
    """Poll `predicate` every `interval_s` until it holds (True) or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


@contextlib.contextmanager
def pool_token():
    """A fresh bearer token in $ENCODER_SERVICE_TOKEN for the block: a Ray cluster started inside it hands it to
    the pool's replicas (deploy/serve_config.yaml requires auth) and this process's clients send it."""
    from encoder_service.client.security import TOKEN_ENV

    before = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = token = secrets.token_urlsafe(16)
    try:
        yield token
    finally:
        if before is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = before


def _ray_start_timed_out(e: BaseException) -> bool:
    return "timed out during startup" in str(e)


def start_local_ray(num_cpus: int) -> None:
    """A local Ray cluster of this process's own (`address="local"`). In full CI runs on the loaded 2-core
    machine a fresh node sometimes did not register with the GCS within Ray's fixed 30 s ("The current node
    timed out during startup"; docs/reliability.md): that start is given up and tried once more."""
    import ray

    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
        if not _ray_start_timed_out(e):
            raise
        ray.shutdown()
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def start_ray_cluster(workers: int, worker_cpus: int, worker_resources: dict):
    """A multi-node cluster on loopback (`ray.cluster_utils.Cluster`: a head and `workers` nodes), this process
    connected to it; a start that timed out (as in `start_local_ray`) is torn down and tried once more."""
    import ray
    from ray.cluster_utils import Cluster

    for attempt in range(2):
        cluster = Cluster(initialize_head=False)
        try:
            cluster.add_node(num_cpus=2, include_dashboard=False)
            nodes = [cluster.add_node(num_cpus=worker_cpus, resources=worker_resources) for _ in range(workers)]
            ray.init(address=cluster.address, log_to_driver=False)
            return cluster, nodes
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            ray.shutdown()
            cluster.shutdown()
            if attempt or not _ray_start_timed_out(e):
                raise


def image_bytes(width: int, height: int, fmt: str = "PNG", seed: int | None = None) -> bytes:
    """A random image encoded as PNG/JPEG/WEBP (lossless formats keep pixels exact)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def gradient_png(width: int, height: int, shift: int) -> bytes:
    """A PNG small on the wire and slow to decode and tile (a smooth ramp compresses well)."""
    ramp = (np.add.outer(np.arange(height), np.arange(width)) + shift) % 256
    buf = io.BytesIO()
    Image.fromarray(np.stack([ramp] * 3, axis=-1).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return tiny_checkpoint_dir(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="session")
def engine_config(tiny_checkpoint) -> EngineConfig:
    return EngineConfig(checkpoint=str(tiny_checkpoint), max_tokens_per_batch=1024, max_tokens_per_request=4096)


@pytest.fixture(scope="session")
def engine(engine_config) -> EncoderEngine:
    return EncoderEngine(engine_config)


@pytest.fixture(scope="session")
def encoder_server(engine_config):
    """A real grpc.aio server on a free loopback port, shared by the session."""
    from encoder_service.serving.api.server import BackgroundServer, ServerConfig

    with BackgroundServer(ServerConfig(port=0, engine=engine_config)) as server:
        yield server


def environment_python(script: str, env_dir: str) -> str:
    """The Python of a test environment that `scripts/<script>` builds into `env_dir` (once; kept after)."""
    done = subprocess.run([str(ROOT / "scripts" / script)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"scripts/{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return str(ROOT / env_dir / "bin" / "python")


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The vLLM test environment's Python (built once: ~2 min, 4 GB; kept in .venv-vllm)."""
    return environment_python("vllm_env.sh", ".venv-vllm")


def vllm_answers(vllm_python: str, cases: dict, tmp_path: Path) -> dict:
    """vLLM's own answers to `cases` (tests/vllm_reference.py, run in the vLLM test environment)."""
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = tmp_path / "answers.json"
    done = subprocess.run([vllm_python, str(ROOT / "tests" / "vllm_reference.py"), str(tmp_path / "cases.json"),
                           str(out)], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": ""})
    assert out.exists(), f"vllm_reference.py died (code {done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(out.read_text())
