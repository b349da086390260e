"""The encoder pool on Ray Serve: one replica per vision GPU (or CPU slot), autoscaled.

Two ways in, one model process per replica (`ModelProcess`: the pipeline batches concurrent
requests; the replica process only transports):
- gRPC through Serve's proxy, the same `EncoderService` API as the standalone server. The
  replica frames the response itself (`Encoded.response_bytes`); Serve forwards the bytes to
  the proxy unchanged.
- Ray-native, for callers inside the cluster (LLM worker actors): `encode_native` on a
  DeploymentHandle returns the serialised header and the embedding tensor's bytes as a uint8
  array, which Ray moves through its object store (read zero-copy on the same node).
  `llm_worker.pool_client.ServeHandleTransport` is the caller's side.

    serve run deploy/serve_config.yaml
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import ray
import yaml
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.reflection import ReflectionServicer
from ray import serve
from ray.serve.config import gRPCOptions

from encoder_service.config import EngineConfig
from encoder_service.errors import EncodeFailed
from encoder_service.serving.api.autoscaling import PENDING_TOKENS
from encoder_service.serving.api.metrics import RayEncoderMetrics, request_stats
from encoder_service.serving.api.security import cache_namespace
from encoder_service.serving.api.services import (HEALTH_NAMES, REFLECTED_SERVICES, SERVE_SERVICER_FUNCTIONS,
                                                  health_response)
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.serving import streaming, wire
from encoder_service.serving.heap import keep_large_buffers_in_heap
from encoder_service.serving.host.model_process import Encoded, ModelProcess
from encoder_service.serving.host.pipeline import PipelineConfig

DEPLOYMENT_NAME = "EncoderDeployment"
DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "deploy" / "serve_config.yaml"
WATCH_POLL_S = 1.0

log = logging.getLogger("ray.serve")


class PreSerialized:
    """A response already serialised: Serve's gRPC path calls `SerializeToString()` on what a
    method returns and hands the bytes to the proxy as they are."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data


@serve.deployment(name=DEPLOYMENT_NAME)
class EncoderDeployment:
    def __init__(self, engine: dict[str, Any], pipeline: dict[str, Any] | None = None, cache_per_token: bool = True):
        self.cache_per_token = cache_per_token
        cfg = EngineConfig(**engine)
        if cfg.device == "auto":
            cfg.device = "cuda" if ray.get_gpu_ids() else "cpu"
        cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        pipeline_cfg = PipelineConfig(**(pipeline or {}))
        if not pipeline_cfg.preprocess_workers:  # the replica's CPUs, one left for serving
            pipeline_cfg.preprocess_workers = max(1, cpus - 1)
        if pipeline_cfg.heap_large_buffers:  # this replica's process frames and sends every answer
            keep_large_buffers_in_heap()
        # One replica per CPU slot: don't let every replica's torch grab every core.
        self.model = ModelProcess(cfg, pipeline_cfg, torch_threads=cpus if cfg.device == "cpu" else 0)
        context = serve.get_replica_context()
        self.replica, self.app_name = context.replica_id.unique_id, context.app_name
        if context.rank is not None and context.rank.rank == 0:  # once per deployment, not once per replica
            config = context._deployment_config
            warning = unplaceable_replicas(
                config.autoscaling_config.max_replicas if config.autoscaling_config else config.num_replicas,
                ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0),
                ray.cluster_resources().get("GPU", 0.0))
            if warning:
                log.warning(warning)
        self._model_info = pb.ModelInfo.FromString(self.model.info_bytes)
        self._reflection = ReflectionServicer(REFLECTED_SERVICES)
        self.metrics = RayEncoderMetrics(self.replica)

    async def _encode(self, request: bytes, timeout_s: float | None, namespace: str) -> Encoded:
        deadline = time.monotonic() + timeout_s if timeout_s else None
        return await asyncio.wrap_future(self.model.submit(request, deadline, {"replica": self.replica}, namespace))

    async def _consume(self, encoded: Encoded, read, started: float):
        """`read(encoded)` on a thread, then the rows go back to the model process; records metrics."""
        try:
            read_from = time.perf_counter()
            out = await asyncio.get_running_loop().run_in_executor(None, read, encoded)
        finally:
            self.model.release(encoded)
        self.metrics.record("OK", time.perf_counter() - started, request_stats(encoded.header), encoded.items,
                            encoded.rows, encoded.nbytes, time.perf_counter() - read_from)
        return out

    async def Encode(self, request: pb.EncodeRequest, grpc_context) -> PreSerialized | pb.EncodeResponse:
        """gRPC through Serve's proxy (deadlines: the proxy's `request_timeout_s`; a cancelled call
        cancels this coroutine, which drops the request's work)."""
        started = time.perf_counter()
        try:
            namespace = cache_namespace(grpc_context.invocation_metadata(), self.cache_per_token)
            encoded = await self._encode(request.SerializeToString(), None, namespace)
            data = await self._consume(encoded, Encoded.response_bytes, started)
        except Exception as e:  # the status travels back through the proxy; the replica keeps serving
            self.metrics.record(wire.status_for(e).name, time.perf_counter() - started)
            grpc_context.set_code(wire.status_for(e))
            grpc_context.set_details(wire.status_message(e))
            grpc_context.set_trailing_metadata(list(wire.status_trailers(e)))
            return pb.EncodeResponse()
        return PreSerialized(data)

    async def _stream(self, request: bytes, timeout_s: float | None, namespace: str, started: float):
        """The streamed call's events (`streaming.model_events`), with this replica's metrics."""
        deadline = time.monotonic() + timeout_s if timeout_s else None
        nbytes = 0
        async with contextlib.aclosing(streaming.model_events(self.model, request, deadline, namespace,
                                                              {"replica": self.replica})) as events:
            async for event in events:
                if isinstance(event, Encoded):
                    self.metrics.record("OK", time.perf_counter() - started, request_stats(event.header),
                                        event.items, event.rows, nbytes, 0.0)
                elif event.rows is not None:
                    nbytes += event.rows.numel()
                yield event

    async def EncodeStream(self, request: pb.EncodeRequest, grpc_context):
        """EncodeStream through Serve's proxy: the messages the standalone server sends (`streaming`);
        a failure ends the stream with Encode's status."""
        started = time.perf_counter()
        info = self.model.info
        try:
            namespace = cache_namespace(grpc_context.invocation_metadata(), self.cache_per_token)
            events = self._stream(request.SerializeToString(), None, namespace, started)
            async for message in streaming.wire_messages(events, info.dtype, info.hidden_size):
                yield PreSerialized(message)
        except Exception as e:
            self.metrics.record(wire.status_for(e).name, time.perf_counter() - started)
            grpc_context.set_code(wire.status_for(e))
            grpc_context.set_details(wire.status_message(e))
            grpc_context.set_trailing_metadata(list(wire.status_trailers(e)))
            # Serve's proxy takes the status from the context that comes with a message: one empty
            # message carries it (clients skip empty messages).
            yield PreSerialized(b"")

    async def encode_stream_native(self, request: bytes, timeout_s: float | None = None, tenant: str = ""):
        """Ray-native EncodeStream (a streaming handle call: `handle.options(stream=True)`): yields
        ("start", request_id, token_counts, model, dtype name, hidden size), ("item", index, serialised
        ItemMetadata, rows as uint8),
        then ("end", serialised EncodeResponse header). Failures raise EncodeFailed as `encode_native`'s."""
        started = time.perf_counter()
        try:
            async for event in self._stream(request, timeout_s, tenant, started):
                if isinstance(event, Encoded):
                    yield ("end", event.header)
                elif event.token_counts is not None:
                    info = self.model.info
                    yield ("start", event.request_id, event.token_counts, event.model,
                           str(info.dtype).removeprefix("torch."), info.hidden_size)
                else:  # a copy of its own (GIL-free): the item's rows go back when the stream ends
                    rows = await asyncio.get_running_loop().run_in_executor(None, lambda r=event.rows: r.clone().numpy())
                    yield ("item", event.index, event.metadata, rows)
        except Exception as e:
            self.metrics.record(wire.status_for(e).name, time.perf_counter() - started)
            index, item_id = wire.failing_item(e) or (None, "")
            raise EncodeFailed(wire.status_for(e).name, wire.status_message(e), index, item_id,
                               wire.missing_items(e)) from None

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context) -> pb.ModelInfo:
        return self._model_info

    # The standard health service, answered by whichever replica the proxy picks: a replica that
    # answers is placed and not draining (Serve routes to neither kind), so the answer is its model
    # process's state. With no replica up the proxy holds the call (a probe's deadline fails it);
    # with the application gone the proxy answers NOT_FOUND.
    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        unknown = self._not_here(request, grpc_context)
        if unknown:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(unknown)
            return health_pb2.HealthCheckResponse()
        return health_response(self.model.alive)

    def _not_here(self, request: health_pb2.HealthCheckRequest, grpc_context) -> str | None:
        """Why this replica cannot answer for what the probe asked, or None. A proxy serving one
        application routes every call to it whatever `application` says: a probe for an application
        not deployed (yet) must not read this one's state."""
        if request.service not in HEALTH_NAMES:
            return f"unknown service {request.service!r}"
        asked = dict(grpc_context.invocation_metadata()).get("application")
        if asked and asked != self.app_name:
            return f"application {asked!r} is not deployed on this Serve proxy (it serves {self.app_name!r})"
        return None

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context):
        """The status now, then each change (this replica's), until the caller or the proxy's request
        timeout ends the stream."""
        if self._not_here(request, grpc_context):
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return
        last = None
        while True:
            now = health_response(self.model.alive)
            if now != last:
                yield now
                last = now
            await asyncio.sleep(WATCH_POLL_S)

    async def ServerReflectionInfo(self, request_stream):
        """Server reflection (grpcurl list / describe) for the services the proxy routes here."""
        async for response in self._reflection.ServerReflectionInfo(request_stream, None):
            yield response

    async def encode_native(self, request: bytes, timeout_s: float | None = None, tenant: str = ""
                            ) -> tuple[bytes, np.ndarray]:
        """Ray-native Encode: a serialised EncodeRequest in; (serialised EncodeResponse header
        without the tensor bytes, the tensor's bytes as uint8) out. `tenant`: the cache namespace
        of a caller inside the cluster (trusted). Failures raise EncodeFailed with the gRPC status
        the gRPC path would give."""
        started = time.perf_counter()
        try:
            encoded = await self._encode(request, timeout_s, tenant)
            # A copy of its own (GIL-free): the arenas' rows go back before Ray serialises the reply.
            payload = await self._consume(encoded, lambda e: e.gather().numpy(), started)
        except Exception as e:
            self.metrics.record(wire.status_for(e).name, time.perf_counter() - started)
            index, item_id = wire.failing_item(e) or (None, "")
            raise EncodeFailed(wire.status_for(e).name, wire.status_message(e), index, item_id,
                               wire.missing_items(e)) from None
        return encoded.header, payload

    async def model_info_native(self) -> bytes:
        return self.model.info_bytes

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (`autoscaling.EncoderLoadPolicy`): the ViT tokens this replica
        has admitted and not finished."""
        stats = await asyncio.to_thread(self.model.stats, 5.0)
        return {PENDING_TOKENS: float(stats.get(PENDING_TOKENS, 0))}

    async def replica_stats(self) -> dict[str, Any]:
        """This replica's id, embedding cache (hits, joins, inserts, evictions, bytes, entries), work done
        (jobs started, device-busy seconds) and memory in use."""
        return {"replica": self.replica, **await asyncio.to_thread(self.model.stats, 5.0)}

    def check_health(self) -> None:
        """Serve restarts a replica whose model process died."""
        if not self.model.alive:
            raise RuntimeError("the encoder model process exited")

    def __del__(self) -> None:
        model = getattr(self, "model", None)
        if model is not None:
            model.close()


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder (`import_path: encoder_service.serving.api.ray_app:build_app` in a Serve config).

    args: `engine` (EngineConfig fields), `pipeline` (PipelineConfig fields),
    `gpus_per_replica` (`gpus_per_replica()`), `cpus_per_replica`, `resources_per_replica` (custom Ray
    resources, e.g. to keep replicas on labelled nodes), `cache_per_token`.
    """
    actor_options = {"num_cpus": args.get("cpus_per_replica", 1), "num_gpus": gpus_per_replica(args),
                     "resources": args.get("resources_per_replica", {})}
    deployment = EncoderDeployment.options(ray_actor_options=actor_options, **args.get("deployment_options", {}))
    return deployment.bind(args.get("engine", {}), args.get("pipeline", {}), args.get("cache_per_token", True))


def gpus_per_replica(args: dict[str, Any]) -> float:
    """`gpus_per_replica` of the app's args: a number (a fraction shares a GPU between replicas), or "auto":
    one GPU per replica when the cluster has GPUs, else CPU replicas."""
    gpus = args.get("gpus_per_replica", "auto")
    if gpus == "auto":
        return 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0
    return float(gpus)


def unplaceable_replicas(max_replicas: int | None, gpus_per_replica: float, cluster_gpus: float) -> str | None:
    """Why some of the pool's replicas cannot be placed on the cluster as it is now, or None.

    Serve leaves a replica it cannot place PENDING without a word; the pool says so once instead."""
    if not max_replicas or gpus_per_replica <= 0 or max_replicas * gpus_per_replica <= cluster_gpus + 1e-9:
        return None
    placeable = int(cluster_gpus / gpus_per_replica + 1e-9)
    return (f"the encoder pool may grow to {max_replicas} replicas of {gpus_per_replica:g} GPU each "
            f"({max_replicas * gpus_per_replica:g} GPUs) but the cluster has {cluster_gpus:g} GPU(s): at most "
            f"{placeable} replica(s) can run, the others stay pending until GPU nodes join (a KubeRay autoscaler "
            f"adds them). Lower max_replicas, or share GPUs (gpus_per_replica: 0.5); see deploy/README.md")


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

