"""Standalone gRPC server (grpc.aio) for one encoder engine.

Bad input is answered with INVALID_ARGUMENT / RESOURCE_EXHAUSTED and a clear message; the
server keeps serving. The event loop only parses requests and hands work to the
`EncodePipeline`; responses are serialised on their own threads (`wire.encode_response_bytes`)
and sent as ready-made bytes, so a 31 MB response never blocks the loop.
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
from encoder_service.engine import EncoderEngine
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.serving import wire
from encoder_service.serving.pipeline import EncodePipeline, PipelineConfig

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
    """The EncoderService methods, on raw-bytes handlers (requests parsed by the generated code,
    responses sent pre-serialised)."""

    def __init__(self, engine: EncoderEngine, pipeline: PipelineConfig | None = None, serialize_threads: int = 4):
        self.engine = engine
        self.pipeline = EncodePipeline(engine, pipeline)
        self.counters = ServiceCounters()
        self._serialize = ThreadPoolExecutor(serialize_threads, thread_name_prefix="encoder-serialize")
        self._model_info = wire.model_info_to_proto(engine.info()).SerializeToString()

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> bytes:
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        loop = asyncio.get_running_loop()
        try:
            items = [wire.media_from_proto(m) for m in request.items]
            out = await asyncio.wrap_future(self.pipeline.submit(items, deadline))
            response = await loop.run_in_executor(self._serialize, wire.encode_response_bytes, request, out)
        except asyncio.CancelledError:  # the client went away; wrap_future cancelled the request's work
            raise
        except Exception as e:  # every failure becomes a status; the server keeps serving
            self.counters.errors += 1
            code = wire.status_for(e)
            if code == grpc.StatusCode.INTERNAL:
                log.error("Encode %s failed", request.request_id, exc_info=e)
            await context.abort(code, f"{type(e).__name__}: {e}" if code == grpc.StatusCode.INTERNAL else str(e))
        self.counters.encode_calls += 1
        self.counters.items_encoded += len(items)
        self.counters.tokens_out += int(out.embeddings.shape[0])
        return response

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> bytes:
        return self._model_info

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Encode": grpc.unary_unary_rpc_method_handler(
                    self.Encode, request_deserializer=pb.EncodeRequest.FromString
                ),
                "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                    self.GetModelInfo, request_deserializer=pb.GetModelInfoRequest.FromString
                ),
            },
        )

    def close(self) -> None:
        self.pipeline.close()
        self._serialize.shutdown(wait=False, cancel_futures=True)


class EncoderServer:
    """An engine behind a grpc.aio server with health checking and reflection."""

    def __init__(self, cfg: ServerConfig, engine: EncoderEngine | None = None):
        self.cfg = cfg
        self.engine = engine or EncoderEngine(cfg.engine)
        self.servicer = EncoderServicer(self.engine, cfg.pipeline, cfg.serialize_threads)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    async def start(self) -> str:
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
        log.info("encoder server on %s (%s)", self.address, self.engine.info().model_name)
        return self.address

    async def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace)
        self.servicer.close()

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()


async def serve_forever(cfg: ServerConfig) -> None:
    server = EncoderServer(cfg)
    await server.start()
    print(f"encoder-service listening on {server.address}", flush=True)
    try:
        await server.wait()
    finally:
        await server.stop()


class BackgroundServer:
    """Runs an EncoderServer on its own event loop in a daemon thread (tests, demos, embedding)."""

    def __init__(self, cfg: ServerConfig, engine: EncoderEngine | None = None):
        self.server = EncoderServer(cfg, engine)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="encoder-grpc", daemon=True)

    def start(self) -> str:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=60)

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
