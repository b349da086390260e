"""The encoder pool's replica on Ray Serve: one model process per replica (`ModelProcess`: its pipeline
batches concurrent requests; the replica process only transports), two ways in, one edge:
- gRPC through Serve's proxy, the same `EncoderService` API as the standalone server. The replica
  frames the response itself (`answers.Answers`); Serve forwards the bytes unchanged;
- Ray-native, for callers inside the cluster (LLM worker actors): `encode_native` on a DeploymentHandle
  returns the serialised header and the embedding tensor's bytes as a uint8 array, which Ray moves
  through its object store (read zero-copy on the same node). `client.pool.ServeHandleTransport` is the
  caller's side.
Both can hand rows out by reference (NIXL, `args.nixl`): the answer then says where they are, under a lease.
Admission, tenant, statuses and metrics are the edge's (`serving.api.edge`), as on the standalone server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any

import grpc
import numpy as np
import ray
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.reflection import ReflectionServicer
from ray import serve

from encoder_service.client.security import tokens_from
from encoder_service.config import EngineConfig
from encoder_service.contract.errors import Unauthenticated, Unavailable
from encoder_service.contract.settings import from_mapping
from encoder_service.contract.wire.metadata import APPLICATION_KEY
from encoder_service.contract.result import dtype_name
from encoder_service.contract.wire.status import as_failure, status_for, status_message, status_trailers
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.serving.api import streaming
from encoder_service.serving.api.answers import Answers
from encoder_service.serving.api.edge import Edge, EdgeLimits, deadline_in
from encoder_service.serving.api.leases import RowLeases, require_token
from encoder_service.serving.api.metrics import RayEncoderMetrics
from encoder_service.serving.api.security import Authenticator
from encoder_service.serving.api.serve.autoscaling import PENDING_TOKENS
from encoder_service.serving.api.services import HEALTH_NAMES, REFLECTED_SERVICES, health_response
from encoder_service.serving.heap import keep_large_buffers_in_heap
from encoder_service.serving.host.model_process import ModelProcess, SharedReply
from encoder_service.serving.host.pipeline import PipelineConfig
from encoder_service.transfer.nixl import NixlSettings

DEPLOYMENT_NAME = "EncoderDeployment"
WATCH_POLL_S = 1.0
STATS_WAIT_S = 2.0  # an autoscaling report waits this long for the model process, then repeats the last one

log = logging.getLogger("ray.serve")


class PreSerialized:
    """A response already serialised: Serve's gRPC path calls `SerializeToString()` on what a
    method returns and hands the bytes to the proxy as they are."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data


def _set_status(grpc_context, error: BaseException) -> None:
    """A failure's status on Serve's gRPC context (it travels back through the proxy)."""
    grpc_context.set_code(status_for(error))
    grpc_context.set_details(status_message(error))
    grpc_context.set_trailing_metadata(list(status_trailers(error)))


@serve.deployment(name=DEPLOYMENT_NAME)
class EncoderDeployment:
    def __init__(self, engine: dict[str, Any], pipeline: dict[str, Any] | None = None, cache_per_token: bool = True,
                 limits: dict[str, Any] | None = None, auth_token_file: str | None = None, require_auth: bool = False,
                 trust_cluster: bool = False, nixl: dict[str, Any] | None = None):
        """`auth_token_file`: the accepted bearer tokens (else $ENCODER_SERVICE_TOKEN_FILE / $ENCODER_SERVICE_TOKEN
        of the replica); `require_auth`: refuse to start without any; `trust_cluster`: handle calls may name no
        tenant. See `security.Authenticator`. `nixl`: `NixlSettings` (rows by reference; off by default)."""
        tokens = tokens_from(auth_token_file)
        if require_auth and not tokens:
            raise ValueError("require_auth is set but no bearer token is configured: give auth_token_file, or "
                             "ENCODER_SERVICE_TOKEN_FILE / ENCODER_SERVICE_TOKEN in the replicas' environment")
        cfg = from_mapping(EngineConfig, engine, "args.engine")
        if cfg.device == "auto":
            cfg.device = "cuda" if ray.get_gpu_ids() else "cpu"
        cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        pipeline_cfg = from_mapping(PipelineConfig, pipeline, "args.pipeline")
        if not pipeline_cfg.preprocess_workers:  # the replica's CPUs, one left for serving
            pipeline_cfg.preprocess_workers = max(1, cpus - 1)
        if pipeline_cfg.heap_large_buffers:  # this replica's process frames and sends every answer
            keep_large_buffers_in_heap()
        # One replica per CPU slot: don't let every replica's torch grab every core.
        self.model = ModelProcess(cfg, pipeline_cfg, torch_threads=cpus if cfg.device == "cpu" else 0)
        self._pending_tokens = 0.0  # the last autoscaling report's
        context = serve.get_replica_context()
        self.replica, self.app_name = context.replica_id.unique_id, context.app_name
        if context.rank is not None and context.rank.rank == 0:  # once per deployment, not once per replica
            from encoder_service.serving.api.serve.app import unplaceable_replicas

            config = context._deployment_config
            warning = unplaceable_replicas(
                config.autoscaling_config.max_replicas if config.autoscaling_config else config.num_replicas,
                ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0),
                ray.cluster_resources().get("GPU", 0.0))
            if warning:
                log.warning(warning)
        nixl_cfg = from_mapping(NixlSettings, nixl, "args.nixl")
        if nixl_cfg.enabled:
            require_token(bool(tokens))
        self.answers = Answers(RowLeases(self.model.shared_memory(), nixl_cfg, self.model.release)
                               if nixl_cfg.enabled else None)
        self._reflection = ReflectionServicer(REFLECTED_SERVICES)
        self.metrics = RayEncoderMetrics(self.replica)
        auth = Authenticator(tokens, shared_cache=not cache_per_token, trust_cluster=trust_cluster)
        self.edge = Edge(from_mapping(EdgeLimits, limits, "args.limits"), self.metrics, auth)
        self._info_bytes = self.edge.access(self.model.info_bytes)
        self._model_info = pb.ModelInfo.FromString(self._info_bytes)

    async def _encode(self, request: bytes, deadline: float | None, namespace: str) -> SharedReply:
        return await self.model.reply(self.model.submit(request, deadline, {"replica": self.replica}, namespace))

    async def _consume(self, reply: SharedReply, read, started: float, namespace: str):
        """The answer by reference (a lease then holds the rows), else `read(reply)` on a thread, then the rows
        go back to the model process; the edge records it."""
        read_from = time.perf_counter()
        if (out := self.answers.by_reference(reply, namespace)) is not None:
            self.edge.succeeded(reply.header, reply.items, reply.rows, started, len(out), time.perf_counter() - read_from)
            return out
        try:
            out = await asyncio.get_running_loop().run_in_executor(None, read, reply)
        finally:
            self.model.release(reply)
        self.edge.succeeded(reply.header, reply.items, reply.rows, started, reply.nbytes,
                            time.perf_counter() - read_from)
        return out

    async def Encode(self, request: pb.EncodeRequest, grpc_context) -> PreSerialized | pb.EncodeResponse:
        """gRPC through Serve's proxy (deadlines: the proxy's `request_timeout_s`; a cancelled call
        cancels this coroutine, which drops the request's work)."""
        started = time.perf_counter()
        data = request.SerializeToString()
        try:
            with self.edge.admitted(len(data), started):
                namespace = self.edge.identify(grpc_context.invocation_metadata()).namespace
                reply = await self._encode(data, None, namespace)
                out = await self._consume(reply, Answers.inline_bytes, started, namespace)
        except Exception as e:  # the status travels back through the proxy; the replica keeps serving
            self.edge.failed(e, started)
            _set_status(grpc_context, e)
            return pb.EncodeResponse()
        return PreSerialized(out)

    async def _stream(self, request: bytes, deadline: float | None, identify, started: float):
        """The streamed call's events (`streaming.model_events`), admitted and recorded by the edge;
        `identify()`: the caller's identity (raises Unauthenticated)."""
        nbytes = 0
        with self.edge.admitted(len(request), started):
            namespace = identify().namespace
            async with contextlib.aclosing(streaming.model_events(self.model, request, deadline, namespace,
                                                                  {"replica": self.replica})) as events:
                async for event in events:
                    if isinstance(event, SharedReply):
                        self.edge.succeeded(event.header, event.items, event.rows, started, nbytes, 0.0)
                    elif event.rows is not None:
                        nbytes += event.rows.numel()
                    yield event

    async def EncodeStream(self, request: pb.EncodeRequest, grpc_context):
        """EncodeStream through Serve's proxy: the messages the standalone server sends (`streaming`);
        a failure ends the stream with Encode's status."""
        started = time.perf_counter()
        info = self.model.info
        try:
            metadata = grpc_context.invocation_metadata()
            events = self._stream(request.SerializeToString(), None, lambda: self.edge.identify(metadata), started)
            async for message in streaming.wire_messages(events, info.dtype, info.hidden_size):
                yield PreSerialized(message)
        except Exception as e:
            self.edge.failed(e, started)
            _set_status(grpc_context, e)
            # Serve's proxy takes the status from the context that comes with a message: one empty
            # message carries it (clients skip empty messages).
            yield PreSerialized(b"")

    async def encode_stream_native(self, request: bytes, timeout_s: float | None = None, tenant: str = ""):
        """Ray-native EncodeStream (a streaming handle call: `handle.options(stream=True)`): yields
        ("start", request_id, token_counts, model, dtype name, hidden size), ("item", index, serialised
        ItemMetadata, rows as uint8), then ("end", serialised EncodeResponse header). Failures raise
        EncodeFailed as `encode_native`'s."""
        started = time.perf_counter()
        try:
            async for event in self._stream(request, deadline_in(timeout_s), lambda: self.edge.identify_handle(tenant),
                                            started):
                if isinstance(event, SharedReply):
                    yield ("end", event.header)
                elif event.token_counts is not None:
                    info = self.model.info
                    yield ("start", event.request_id, event.token_counts, event.model, dtype_name(info.dtype),
                           info.hidden_size)
                else:  # a copy of its own (GIL-free): the item's rows go back when the stream ends
                    rows = await asyncio.get_running_loop().run_in_executor(None, lambda r=event.rows: r.clone().numpy())
                    yield ("item", event.index, event.metadata, rows)
        except Exception as e:
            self.edge.failed(e, started)
            raise as_failure(e) from None

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context) -> pb.ModelInfo:
        try:
            self.edge.identify(grpc_context.invocation_metadata())
        except Unauthenticated as e:
            _set_status(grpc_context, e)
            return pb.ModelInfo()
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
        asked = dict(grpc_context.invocation_metadata()).get(APPLICATION_KEY)
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
        without the tensor bytes, the tensor's bytes as uint8) out. `tenant`: the tenant a caller inside the
        cluster names (trusted; required where tokens are, unless trust_cluster). Failures raise
        EncodeFailed with the gRPC status the gRPC path would give."""
        started = time.perf_counter()
        try:
            with self.edge.admitted(len(request), started):
                namespace = self.edge.identify_handle(tenant).namespace
                reply = await self._encode(request, deadline_in(timeout_s), namespace)
                out = await self._consume(reply, Answers.inline_parts, started, namespace)
        except Exception as e:
            self.edge.failed(e, started)
            raise as_failure(e) from None
        return (out, np.empty(0, dtype=np.uint8)) if isinstance(out, bytes) else out

    async def model_info_native(self) -> bytes:
        return self._info_bytes

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (`autoscaling.EncoderLoadPolicy`): the ViT tokens this replica
        has admitted and not finished. A model process too busy to answer in time gets its last count
        reported: no report at all would read as an idle replica."""
        with contextlib.suppress(TimeoutError, Unavailable):
            stats = await asyncio.to_thread(self.model.stats, STATS_WAIT_S)
            self._pending_tokens = float(stats.get(PENDING_TOKENS, 0))
        return {PENDING_TOKENS: self._pending_tokens}

    async def replica_stats(self) -> dict[str, Any]:
        """This replica's id, embedding cache (hits, joins, inserts, evictions, bytes, entries), work done
        (jobs started, device-busy seconds), memory in use, and rows under lease."""
        leases = self.answers.leases
        return {"replica": self.replica, **await asyncio.to_thread(self.model.stats, 5.0),
                "by_reference_inline": self.answers.by_reference_inline,
                **({f"leases_{k}": v for k, v in dataclasses.asdict(leases.stats).items()} if leases else {})}

    def check_health(self) -> None:
        """Serve restarts a replica whose model process died."""
        if not self.model.alive:
            raise RuntimeError("the encoder model process exited")

    def __del__(self) -> None:
        answers = getattr(self, "answers", None)
        if answers is not None and answers.leases is not None:
            answers.leases.close()
        model = getattr(self, "model", None)
        if model is not None:
            model.close()
