"""Standalone gRPC server (grpc.aio) for one encoder.

The model runs in a child process (`ModelProcess`); this process is the transport only: the
event loop hands each request's bytes to the child unparsed, and a finished response is framed
from the child's header and the rows in shared memory on serialiser threads
(`answers.Answers`), then sent as ready-made bytes, so a 31 MB response never blocks the
loop and never stalls the model's kernel launches. With NIXL on, an answer may instead hand out where
its rows are, under a lease (`leases`).

Bad input is answered with INVALID_ARGUMENT / RESOURCE_EXHAUSTED and a clear message; the
server keeps serving. If the model process dies, health turns NOT_SERVING and calls get
UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from encoder_service.config import EngineConfig
from encoder_service.contract.wire.channel import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from encoder_service.contract.wire.status import status_for, status_message, status_trailers
from encoder_service.contract.wire.streams import DEFAULT_CHUNK_BYTES
from encoder_service.serving.api import streaming
from encoder_service.serving.api.answers import Answers
from encoder_service.serving.api.edge import Edge, EdgeLimits, ServiceCounters, deadline_in
from encoder_service.serving.api.leases import RowLeases, require_token
from encoder_service.serving.api.metrics import EncoderMetrics
from encoder_service.serving.api.security import Authenticator, TLSConfig, TokenCheck, is_loopback, tokens_from
from encoder_service.serving.api.services import ENCODER_SERVICE, HEALTH_NAMES, REFLECTED_SERVICES
from encoder_service.serving.heap import keep_large_buffers_in_heap
from encoder_service.serving.host.model_process import ModelProcess
from encoder_service.serving.host.pipeline import PipelineConfig
from encoder_service.transfer.nixl import NixlSettings

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # largest response sent
    max_request_bytes: int = 64 << 20  # largest request accepted (gRPC refuses more: RESOURCE_EXHAUSTED)
    # Admission (`edge.EdgeLimits`): requests beyond these in flight are refused at once with UNAVAILABLE +
    # retry-after-ms (retry later or on another replica) instead of queueing without bound.
    max_inflight_request_bytes: int = 256 << 20
    max_inflight_requests: int = 128
    retry_after_ms: int = 200
    drain_grace_s: float = 30.0  # on SIGTERM: NOT_SERVING, no new calls, in-flight ones get this long
    # ... and once they are answered the connections stay open this long (within the grace) before they close.
    drain_linger_s: float = 1.0
    metrics_port: int | None = None  # Prometheus /metrics on this port (0: a free one); None: off
    serialize_threads: int = 4
    stream_chunk_bytes: int = DEFAULT_CHUNK_BYTES  # EncodeStream: rows per message at most
    tls: TLSConfig | None = None
    # Accepted tokens, one per line (a tenant each, or old + new while rotating); else $ENCODER_SERVICE_TOKEN_FILE /
    # $ENCODER_SERVICE_TOKEN; none: no token.
    auth_token_file: str | None = None
    insecure: bool = False  # allow a non-loopback address without TLS
    # Embedding-cache entries per bearer token (a probe cannot reveal another tenant's images); False: one cache
    # for everybody, which lets any caller learn whether an image was sent and fetch its rows (README).
    cache_per_token: bool = True
    # Rows by reference (NIXL): off unless enabled; read the trust model in the README first.
    nixl: NixlSettings = field(default_factory=NixlSettings)
    engine: EngineConfig = field(default_factory=EngineConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def check(self) -> None:
        """Refuse what would expose an unauthenticated plaintext server beyond this machine."""
        if self.tls is None and not self.insecure and not is_loopback(self.host):
            raise ValueError(f"refusing to listen on {self.host!r} without TLS: give a certificate and key "
                             f"(--tls-cert/--tls-key), or pass --insecure to serve plaintext on purpose")

    @property
    def limits(self) -> EdgeLimits:
        return EdgeLimits(self.max_inflight_request_bytes, self.max_inflight_requests, self.retry_after_ms)


class EncoderServicer:
    """The EncoderService methods, on raw-bytes handlers: requests go to the model process as they
    arrived, responses leave pre-serialised. Admission, tenant, statuses and metrics: the edge's."""

    def __init__(self, model: ModelProcess, cfg: ServerConfig, auth: Authenticator):
        self.model, self.cfg = model, cfg
        if cfg.nixl.enabled:
            require_token(auth.required)
        leases = RowLeases(model.shared_memory(), cfg.nixl, model.release) if cfg.nixl.enabled else None
        self.answers = Answers(leases)
        self.metrics = EncoderMetrics(model.stats, lambda: (self.edge.inflight_requests, self.edge.inflight_bytes),
                                      self.answers)
        self.edge = Edge(cfg.limits, self.metrics, auth)
        self._info = self.edge.access(model.info_bytes)
        self._serialize = ThreadPoolExecutor(cfg.serialize_threads, thread_name_prefix="encoder-serialize")

    @property
    def counters(self) -> ServiceCounters:
        return self.edge.counters

    async def _fail(self, e: Exception, context: grpc.aio.ServicerContext, started: float,
                    deadline: float | None) -> None:
        """Every failure becomes a status; the server keeps serving."""
        self.edge.failed(e, started)
        if context.cancelled() or (deadline is not None and time.monotonic() >= deadline):
            raise asyncio.CancelledError from None  # the caller is gone: no status to send
        await context.abort(status_for(e), status_message(e), status_trailers(e))

    async def Encode(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        deadline = deadline_in(context.time_remaining())
        try:
            with self.edge.admitted(len(request), started):
                namespace = self.edge.identify(context.invocation_metadata()).namespace
                reply = await self.model.reply(self.model.submit(request, deadline, namespace=namespace))
                serialize_from = time.perf_counter()
                if (response := self.answers.by_reference(reply, namespace)) is None:  # else: the lease's now
                    try:
                        response = await asyncio.get_running_loop().run_in_executor(self._serialize,
                                                                                    Answers.inline_bytes, reply)
                    finally:
                        self.model.release(reply)
                serialize_s = time.perf_counter() - serialize_from
        except asyncio.CancelledError:  # the client went away; cancelling the call drops its work
            self.edge.cancelled(started)
            raise
        except Exception as e:
            await self._fail(e, context, started, deadline)
        self.edge.succeeded(reply.header, reply.items, reply.rows, started, len(response), serialize_s)
        return response

    async def EncodeStream(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        """Encode, each item's rows sent as soon as they are ready (`streaming`): a StreamStart, the items
        in completion order, a StreamEnd; a failure ends the stream with Encode's status.

        Written with `context.write`, not as a generator: a client that hangs up cancels this coroutine
        where it waits, so the items' rows go back at once (a generator handler is left suspended at its
        `yield`, and its rows wait for the generator to be finalized)."""
        started = time.perf_counter()
        deadline = deadline_in(context.time_remaining())
        info, tally = self.model.info, streaming.StreamTally()
        try:
            with self.edge.admitted(len(request), started):
                namespace = self.edge.identify(context.invocation_metadata()).namespace
                async with contextlib.aclosing(streaming.model_events(self.model, request, deadline,
                                                                      namespace)) as events, \
                        contextlib.aclosing(streaming.wire_messages(events, info.dtype, info.hidden_size,
                                                                    self.cfg.stream_chunk_bytes, self._serialize,
                                                                    tally)) as messages:
                    async for message in messages:
                        await context.write(message)
        except asyncio.CancelledError:
            self.edge.cancelled(started)
            raise
        except Exception as e:
            await self._fail(e, context, started, deadline)
        reply = tally.reply
        self.edge.succeeded(reply.header, reply.items, reply.rows, started, tally.sent, tally.serialize_s)

    async def GetModelInfo(self, request: bytes, context) -> bytes:
        return self._info

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            ENCODER_SERVICE,
            {
                "Encode": grpc.unary_unary_rpc_method_handler(self.Encode),
                "EncodeStream": grpc.unary_stream_rpc_method_handler(self.EncodeStream),
                "GetModelInfo": grpc.unary_unary_rpc_method_handler(self.GetModelInfo),
            },
        )

    def close(self) -> None:
        self._serialize.shutdown(wait=False, cancel_futures=True)
        if self.answers.leases is not None:
            self.answers.leases.close()
        self.metrics.close()


class EncoderServer:
    """The encoder (in its model process) behind a grpc.aio server with health checking and reflection."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        cfg.check()
        self.auth = Authenticator(tokens_from(cfg.auth_token_file), shared_cache=not cfg.cache_per_token)
        self.model = ModelProcess(cfg.engine, cfg.pipeline, on_exit=self._model_exited)
        self.servicer = EncoderServicer(self.model, cfg, self.auth)

    def _model_exited(self) -> None:
        """The model process died (reader thread): stop advertising SERVING."""
        if self._loop is not None and not self._loop.is_closed():
            for name in HEALTH_NAMES:
                asyncio.run_coroutine_threadsafe(self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING),
                                                 self._loop)

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    async def start(self) -> str:
        self._loop = asyncio.get_running_loop()
        options = channel_options(self.cfg.max_message_bytes, self.cfg.max_request_bytes)
        interceptors = [TokenCheck(self.auth)] if self.auth.required else []
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        self.server.add_generic_rpc_handlers((self.servicer.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(REFLECTED_SERVICES, self.server)
        where = f"{self.cfg.host}:{self.cfg.port}"
        if self.cfg.tls is not None:
            self.port = self.server.add_secure_port(where, self.cfg.tls.credentials())
        else:
            self.port = self.server.add_insecure_port(where)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.cfg.host}:{self.cfg.port}")
        await self.server.start()
        if self.cfg.metrics_port is not None:
            self.metrics_port = self.servicer.metrics.serve_http(self.cfg.metrics_port, self.cfg.host)
        for name in HEALTH_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("encoder server on %s (%s)", self.address, self.model.info.model_name)
        return self.address

    async def stop(self, grace: float = 1.0) -> None:
        """Drain: health says NOT_SERVING, new calls are refused (UNAVAILABLE), calls in flight get
        `grace` seconds to finish; then the model process is shut down.

        New calls are refused by the edge, not by closing connections: those close only once the calls in
        flight were answered, and a moment later (`drain_linger_s`). A socket closed with its client's last
        frames unread sends a TCP reset, and a reset makes the client's kernel drop what it has not read
        yet, the end of an answer included (docs/reliability.md, the drain flake)."""
        if self.server is not None:
            deadline = time.monotonic() + grace
            await self.health.enter_graceful_shutdown()
            edge = self.servicer.edge
            edge.drain()
            if await edge.idle(deadline):
                await asyncio.sleep(max(0.0, min(self.cfg.drain_linger_s, deadline - time.monotonic())))
            await self.server.stop(max(0.0, deadline - time.monotonic()))
        self.servicer.close()
        await asyncio.to_thread(self.model.close)

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()


async def serve_forever(cfg: ServerConfig) -> None:
    """Serve until SIGTERM/SIGINT, then drain (`EncoderServer.stop` with `cfg.drain_grace_s`)."""
    if cfg.pipeline.heap_large_buffers:  # this process frames and sends every answer
        keep_large_buffers_in_heap()
    server = EncoderServer(cfg)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        print(f"encoder-service listening on {server.address}", flush=True)
        if server.metrics_port is not None:  # the port chosen, when asked for 0
            print(f"encoder-service metrics on http://{cfg.host}:{server.metrics_port}/metrics", flush=True)
        ended = asyncio.ensure_future(server.wait())
        await asyncio.wait([ended, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.warning("draining: finishing calls in flight (up to %.0f s)", cfg.drain_grace_s)
    finally:
        await server.stop(cfg.drain_grace_s)


class BackgroundServer:
    """Runs an EncoderServer on its own event loop in a daemon thread (tests, demos, embedding)."""

    def __init__(self, cfg: ServerConfig):
        self.server = EncoderServer(cfg)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="encoder-grpc", daemon=True)

    def start(self) -> str:
        self._thread.start()
        try:
            return asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=60)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace=0.5), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def counters(self) -> ServiceCounters:
        return self.server.servicer.counters

    def __enter__(self) -> "BackgroundServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
