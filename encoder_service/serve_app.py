"""The encoder pool on Ray Serve: one replica per vision GPU (or CPU slot), autoscaled.

Clients reach it through Ray Serve's gRPC proxy with the same `EncoderService` API as
the standalone server (`encoder_service.v1.EncoderService/Encode`). Each replica batches
concurrent requests into one ragged batch with the same RequestBatcher.

    serve run deploy/serve_config.yaml
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve
from ray.serve.config import gRPCOptions

from encoder_service import wire
from encoder_service.config import EngineConfig
from encoder_service.engine import EncoderEngine
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.request_batcher import BatcherConfig, RequestBatcher
from encoder_service.server import status_for

SERVICER_FUNCTION = "encoder_service.proto.encoder_pb2_grpc.add_EncoderServiceServicer_to_server"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "serve_config.yaml"


@serve.deployment(name="EncoderDeployment")
class EncoderDeployment:
    def __init__(self, engine: dict[str, Any], batching: dict[str, Any] | None = None):
        cfg = EngineConfig(**engine)
        if cfg.device == "auto":
            cfg.device = "cuda" if ray.get_gpu_ids() else "cpu"
        if cfg.device == "cpu":
            import torch

            # One replica per CPU slot: don't let every replica's torch grab every core.
            torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.engine = EncoderEngine(cfg)
        self.batcher = RequestBatcher(self.engine, BatcherConfig(**(batching or {})))
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def Encode(self, request: pb.EncodeRequest, grpc_context) -> pb.EncodeResponse:
        try:
            items = [wire.media_from_proto(m) for m in request.items]
            out = await self.batcher.submit(items)
        except Exception as e:  # the status travels back through the proxy; the replica keeps serving
            grpc_context.set_code(status_for(e))
            grpc_context.set_details(str(e))
            return pb.EncodeResponse()
        out.stats["replica"] = self.replica
        return wire.encode_response(request, out)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context) -> pb.ModelInfo:
        return wire.model_info_to_proto(self.engine.info())


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder (`import_path: encoder_service.serve_app:build_app` in a Serve config).

    args: `engine` (EngineConfig fields), `batching` (BatcherConfig fields),
    `gpus_per_replica` ("auto": 1 when the cluster has GPUs, else 0), `cpus_per_replica`.
    """
    gpus = args.get("gpus_per_replica", "auto")
    if gpus == "auto":
        gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0
    actor_options = {"num_cpus": args.get("cpus_per_replica", 1), "num_gpus": gpus}
    deployment = EncoderDeployment.options(ray_actor_options=actor_options, **args.get("deployment_options", {}))
    return deployment.bind(args.get("engine", {}), args.get("batching", {}))


# --------------------------------------------------------------------- deploying from Python


def free_port() -> int:
    """A loopback port nobody is listening on now (for local clusters, demos and tests)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_serve_config(path: str | os.PathLike = DEFAULT_CONFIG) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


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
            grpc_servicer_functions=grpc_cfg.get("grpc_servicer_functions", [SERVICER_FUNCTION]),
            request_timeout_s=grpc_cfg.get("request_timeout_s"),
        ),
    )
    app_cfg = config["applications"][0]
    overrides = {k: v for k, v in app_cfg.get("deployments", [{}])[0].items() if k != "name"}
    args = dict(app_cfg.get("args", {}))
    args["deployment_options"] = {**args.get("deployment_options", {}), **overrides}
    serve.run(build_app(args), name=app_cfg["name"], route_prefix=app_cfg.get("route_prefix"), blocking=False)
    _wait_running(app_cfg["name"], blocking_timeout_s)
    return f"127.0.0.1:{grpc_cfg.get('port', 9000)}"


def _wait_running(app: str, timeout_s: float) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING":
            return
        time.sleep(0.2)
    raise TimeoutError(f"Serve application {app!r} not RUNNING after {timeout_s}s")


def running_replicas(app: str, deployment: str = "EncoderDeployment") -> int:
    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)

