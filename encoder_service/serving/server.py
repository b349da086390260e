"""Standalone gRPC server (grpc.aio) for one encoder.

The model runs in a child process (`ModelProcess`); this process is the transport only: the
event loop hands each request's bytes to the child unparsed, and a finished response is framed
from the child's header and the rows in shared memory on serialiser threads
(`wire.response_bytes`), then sent as ready-made bytes, so a 31 MB response never blocks the
loop and never stalls the model's kernel launches.

Bad input is answered with INVALID_ARGUMENT / RESOURCE_EXHAUSTED and a clear message; the
server keeps serving. If the model process dies, health turns NOT_SERVING and calls get
UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from encoder_service.config import EngineConfig
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.serving import wire
from encoder_service.serving.model_process import ModelProcess
from encoder_service.serving.pipeline import PipelineConfig

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EncoderService"].full_name


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port
    max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES
    serialize_threads: int = 4
    engine: EngineConfig = field(default_factory=EngineConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


@dataclass
class ServiceCounters:
    """What the server did: lets tests and operators see how often the encoder really ran."""

    encode_calls: int = 0
    items_encoded: int = 0
    tokens_out: int = 0
    errors: int = 0


class EncoderServicer:
    """The EncoderService methods, on raw-bytes handlers: requests go to the model process as they
    arrived, responses leave pre-serialised."""

    def __init__(self, model: ModelProcess, serialize_threads: int = 4):
        self.model = model
        self.counters = ServiceCounters()
        self._serialize = ThreadPoolExecutor(serialize_threads, thread_name_prefix="encoder-serialize")

    async def Encode(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        try:
            encoded = await asyncio.wrap_future(self.model.submit(request, deadline))
            try:
                response = await asyncio.get_running_loop().run_in_executor(self._serialize, encoded.response_bytes)
            finally:
                self.model.release(encoded)
        except asyncio.CancelledError:  # the client went away; cancelling the call drops its work
            raise
        except Exception as e:  # every failure becomes a status; the server keeps serving
            self.counters.errors += 1
            await context.abort(wire.status_for(e), wire.status_message(e))
        self.counters.encode_calls += 1
        self.counters.items_encoded += encoded.items
        self.counters.tokens_out += encoded.rows
        return response

    async def GetModelInfo(self, request: bytes, context) -> bytes:
        return self.model.info_bytes

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Encode": grpc.unary_unary_rpc_method_handler(self.Encode),
                "GetModelInfo": grpc.unary_unary_rpc_method_handler(self.GetModelInfo),
            },
        )

    def close(self) -> None:
        self._serialize.shutdown(wait=False, cancel_futures=True)


class EncoderServer:
    """The encoder (in its model process) behind a grpc.aio server with health checking and reflection."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.model = ModelProcess(cfg.engine, cfg.pipeline, on_exit=self._model_exited)
        self.servicer = EncoderServicer(self.model, cfg.serialize_threads)

    def _model_exited(self) -> None:
        """The model process died (reader thread): stop advertising SERVING."""
        if self._loop is not None and not self._loop.is_closed():
            for name in ("", SERVICE_NAME):
                asyncio.run_coroutine_threadsafe(self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING),
                                                 self._loop)

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    async def start(self) -> str:
        self._loop = asyncio.get_running_loop()
        self.server = grpc.aio.server(options=wire.channel_options(self.cfg.max_message_bytes))
        self.server.add_generic_rpc_handlers((self.servicer.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        self.port = self.server.add_insecure_port(f"{self.cfg.host}:{self.cfg.port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.cfg.host}:{self.cfg.port}")
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("encoder server on %s (%s)", self.address, self.model.info.model_name)
        return self.address

    async def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace)
        self.servicer.close()
        await asyncio.to_thread(self.model.close)

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()


async def serve_forever(cfg: ServerConfig) -> None:
    server = EncoderServer(cfg)
    try:
        await server.start()
        print(f"encoder-service listening on {server.address}", flush=True)
        await server.wait()
    finally:
        await server.stop()


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
