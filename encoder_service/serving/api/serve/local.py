"""Running the pool on a local or existing Ray cluster from Python, exactly as `serve run` would
(demos, tests, benches)."""

from __future__ import annotations

import copy
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve
from ray.serve.config import gRPCOptions

from encoder_service.client.security import TOKEN_ENV
from encoder_service.serving.api.serve.app import build_app, gpus_per_replica, unplaceable_replicas
from encoder_service.serving.api.serve.deployment import DEPLOYMENT_NAME
from encoder_service.serving.api.services import SERVE_SERVICER_FUNCTIONS

DEFAULT_CONFIG = Path(__file__).resolve().parents[4] / "deploy" / "serve_config.yaml"

log = logging.getLogger("ray.serve")


def local_auth(token: str | None = None) -> str:
    """A bearer token for a pool on a local cluster, set as $ENCODER_SERVICE_TOKEN in this process: call it
    before Ray starts, and the replicas (which inherit the environment) accept it while this process's
    clients send it (`ClientSecurity.from_env`). Returns the token (a fresh random one unless given)."""
    token = token or os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
    os.environ[TOKEN_ENV] = token
    return token


def free_port() -> int:
    """A loopback port nobody is listening on now (for local clusters, demos and tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_serve_config(path: str | os.PathLike = DEFAULT_CONFIG) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def cpu_pool_config(checkpoint: str | os.PathLike | None = None, replicas: int = 1, cache_mb: int = 32,
                    arena_mb: int = 32, dtype: str | None = None) -> dict[str, Any]:
    """deploy/serve_config.yaml sized for a CPU machine (tests, benches, scripts): proxies on free ports,
    `replicas` CPU replicas (fixed), one preprocessing worker each, small arenas; `checkpoint` (default:
    the config's) loaded on the CPU."""
    cfg = load_serve_config()
    cfg["grpc_options"]["port"], cfg["http_options"]["port"] = free_port(), free_port()
    app = cfg["applications"][0]
    app["args"].update(gpus_per_replica=0)
    if checkpoint is not None:
        app["args"]["engine"].update(checkpoint=str(checkpoint), device="cpu")
    if dtype is not None:
        app["args"]["engine"].update(dtype=dtype)
    app["args"]["pipeline"].update(preprocess_workers=1, arena_mb=arena_mb, cache_mb=cache_mb)
    app["deployments"][0]["autoscaling_config"].update(min_replicas=replicas, max_replicas=replicas)
    return cfg


def deploy(config: dict[str, Any], blocking_timeout_s: float = 180.0) -> str:
    """Deploy the first application of a Serve config dict (the YAML's content) on the current
    Ray cluster, exactly as `serve run` would: its gRPC options, its args, its deployment
    overrides (autoscaling_config, max_ongoing_requests, ...). Returns the gRPC address.

    Serve's proxy ports are fixed when Serve first starts on a cluster: redeploying with
    other ports keeps the first ones."""
    config = copy.deepcopy(config)
    grpc_cfg = config.get("grpc_options", {})
    http_cfg = config.get("http_options", {})
    serve.start(
        http_options={"host": http_cfg.get("host", "127.0.0.1"), "port": http_cfg.get("port", 8000)},
        grpc_options=gRPCOptions(
            port=grpc_cfg.get("port", 9000),
            grpc_servicer_functions=grpc_cfg.get("grpc_servicer_functions", SERVE_SERVICER_FUNCTIONS),
            request_timeout_s=grpc_cfg.get("request_timeout_s"),
        ),
    )
    app_cfg = config["applications"][0]
    overrides = {k: v for k, v in app_cfg.get("deployments", [{}])[0].items() if k != "name"}
    args = dict(app_cfg.get("args", {}))
    args["deployment_options"] = {**args.get("deployment_options", {}), **overrides}
    autoscaling = overrides.get("autoscaling_config") or {}
    warning = unplaceable_replicas(autoscaling.get("max_replicas", overrides.get("num_replicas", 1)),
                                   gpus_per_replica(args), ray.cluster_resources().get("GPU", 0.0))
    if warning:
        log.warning(warning)
    handle = serve.run(build_app(args), name=app_cfg["name"], route_prefix=app_cfg.get("route_prefix"), blocking=False)
    handle.shutdown()  # unused here; its router's background tasks would outlive Serve (and reconnect to Ray)
    _wait_running(app_cfg["name"], blocking_timeout_s)
    return f"127.0.0.1:{grpc_cfg.get('port', 9000)}"


def _wait_running(app: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING":
            return
        time.sleep(0.2)
    raise TimeoutError(f"Serve application {app!r} not RUNNING after {timeout_s}s")


def running_replicas(app: str, deployment: str = DEPLOYMENT_NAME) -> int:
    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)

