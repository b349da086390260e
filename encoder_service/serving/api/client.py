"""Blocking gRPC client for the encoder service (the LLM worker's side of the wire).

Probe, then upload (`probe=True`): items go first as their media digests alone; the server answers
cached items from its cache and names the others (NOT_FOUND, CACHE_MISS), which are then sent with
their bytes. A repeated image costs its digest (~80 bytes) instead of its file.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from encoder_service.digest import MediaDigest, media_digest
from encoder_service.engine import ModelInfo
from encoder_service.processor import MediaInput, Modality
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.proto import encoder_pb2_grpc as pb_grpc
from encoder_service.serving import wire
from encoder_service.serving.api.security import ClientSecurity

ENCODE_METHOD = f"/{pb.DESCRIPTOR.services_by_name['EncoderService'].full_name}/Encode"


def by_digest(item: MediaInput, digest: str | None = None) -> MediaInput:
    """The item with its media replaced by the media's digest (options kept: they are part of the rows)."""
    return dataclasses.replace(item, data=MediaDigest(digest or media_digest(item.data)))


def probe_then_upload(call: Callable[[list[MediaInput]], wire.EncodeResult], items: list[MediaInput],
                      digests: Sequence[str] | None = None) -> wire.EncodeResult:
    """`call` with every item by digest; items the server lacks are sent again with their media. Entries
    evicted between the two calls are uploaded on a third; an item already sent by digest stays so."""
    digests = digests or [media_digest(item.data) for item in items]
    sent = [item if isinstance(item.data, MediaDigest) else by_digest(item, d) for item, d in zip(items, digests)]
    for _ in range(3):
        try:
            return call(sent)
        except grpc.RpcError as e:
            missing = wire.cache_misses_from_status(e)
            if not missing or all(sent[i] is items[i] for i in missing):
                raise
            for i in missing:
                sent[i] = items[i]
    return call(sent)


# While waiting for readiness, these mean "not yet" (no server, app not deployed, no replica up yet).
NOT_READY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED)


class EncoderClient:
    def __init__(self, address: str, timeout: float = 60.0, max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
                 security: ClientSecurity | None = None, probe: bool = False, application: str = ""):
        """`address`: a standalone server or a Ray Serve pool's gRPC proxy (host:port).
        `security`: TLS / mTLS / bearer token; default from the environment (`ClientSecurity.from_env`).
        `probe`: send items by digest first, their media only if the server lacks them.
        `application`: the Serve application to reach through a proxy serving several (gRPC metadata)."""
        self.address, self.timeout, self.probe = address, timeout, probe
        self.metadata: tuple[tuple[str, str], ...] = (("application", application),) if application else ()
        self.bytes_sent = 0  # serialised EncodeRequest bytes (what probing saves)
        security = security if security is not None else ClientSecurity.from_env()
        self.channel = security.channel(address, wire.channel_options(max_message_bytes))
        self.stub = pb_grpc.EncoderServiceStub(self.channel)
        # Responses arrive as bytes and are parsed in place (`wire.decode_response`).
        self._encode = self.channel.unary_unary(ENCODE_METHOD, request_serializer=pb.EncodeRequest.SerializeToString)

    def encode(
        self,
        items: list[MediaInput],
        request_id: str | None = None,
        timeout: float | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
        copy: bool = True,
        probe: bool | None = None,
        digests: Sequence[str] | None = None,
    ) -> wire.EncodeResult:
        """Encode `items` in one call (two with `probe` when some are not cached). copy=False returns a
        read-only view of the received message (saves a copy for callers that copy rows out anyway, like
        the LLM worker's cache). `digests`: the items' media digests, if the caller has them."""
        request_id = request_id or uuid.uuid4().hex

        def call(sent: list[MediaInput]) -> wire.EncodeResult:
            request = pb.EncodeRequest(request_id=request_id, items=[wire.media_to_proto(i) for i in sent])
            self.bytes_sent += request.ByteSize()
            return wire.decode_response(
                self._encode(request, timeout=timeout or self.timeout, metadata=self.metadata + tuple(metadata or ())),
                copy=copy)

        return probe_then_upload(call, items, digests) if (self.probe if probe is None else probe) else call(items)

    def model_info(self, timeout: float | None = None, metadata=None) -> ModelInfo:
        msg = self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout or self.timeout,
                                     metadata=self.metadata + tuple(metadata or ()))
        return wire.model_info_from_proto(msg)

    def health(self, timeout: float = 5.0) -> str:
        """The standard health check's answer (SERVING, NOT_SERVING, ...); raises grpc.RpcError when the
        endpoint does not answer it (a Serve proxy without the health service: UNIMPLEMENTED)."""
        answer = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout,
                                                                metadata=self.metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)

    def wait_ready(self, timeout: float = 30.0) -> str:
        """Block until the endpoint can take work: the standard health check says SERVING. An endpoint
        that does not implement it (a Serve proxy configured without the health service) is asked for
        GetModelInfo instead. Returns the check that answered: "health" or "model-info".

        Raises grpc.FutureTimeoutError if nothing listens at the address, RuntimeError if the endpoint
        answers but is not ready by `timeout` (NOT_SERVING, application not deployed, no replica up)."""
        deadline = time.monotonic() + timeout
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        while True:
            left = max(0.1, deadline - time.monotonic())
            try:
                status = self.health(timeout=min(left, 5.0))
                if status == "SERVING":
                    return "health"
                why = f"health check says {status}"
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self.model_info(timeout=left)
                    return "model-info"
                if e.code() not in NOT_READY_CODES:
                    raise
                why = f"{e.code().name}: {e.details()}"
            if time.monotonic() >= deadline:
                raise RuntimeError(f"encoder at {self.address} is not serving after {timeout:g} s ({why})")
            time.sleep(0.2)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "EncoderClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def image_file(path: str | Path, item_id: str | None = None) -> MediaInput:
    """An image file as a MediaInput (bytes are sent as-is; the server decodes)."""
    path = Path(path)
    return MediaInput(Modality.IMAGE, path.read_bytes(), item_id=item_id or path.name)
