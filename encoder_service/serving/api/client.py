"""Blocking gRPC client for the encoder service (the LLM worker's side of the wire).

Probe, then upload (`probe=True`): items go first as their media digests alone; the server answers
cached items from its cache and names the others (NOT_FOUND, CACHE_MISS), which are then sent with
their bytes. A repeated image costs its digest (~80 bytes) instead of its file.
"""

from __future__ import annotations

import dataclasses
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


class EncoderClient:
    def __init__(self, address: str, timeout: float = 60.0, max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
                 security: ClientSecurity | None = None, probe: bool = False):
        """`security`: TLS / mTLS / bearer token; default from the environment (`ClientSecurity.from_env`).
        `probe`: send items by digest first, their media only if the server lacks them."""
        self.address, self.timeout, self.probe = address, timeout, probe
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
            return wire.decode_response(self._encode(request, timeout=timeout or self.timeout, metadata=metadata),
                                        copy=copy)

        return probe_then_upload(call, items, digests) if (self.probe if probe is None else probe) else call(items)

    def model_info(self, timeout: float | None = None, metadata=None) -> ModelInfo:
        msg = self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout or self.timeout, metadata=metadata)
        return wire.model_info_from_proto(msg)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server's standard health check says SERVING."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        status = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        if status.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"encoder at {self.address} is not serving: {status.status}")

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
