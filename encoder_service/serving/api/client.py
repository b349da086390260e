"""Blocking gRPC client for the encoder service (the LLM worker's side of the wire)."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from encoder_service.engine import ModelInfo
from encoder_service.processor import MediaInput, Modality
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.proto import encoder_pb2_grpc as pb_grpc
from encoder_service.serving import wire
from encoder_service.serving.api.security import ClientSecurity

ENCODE_METHOD = f"/{pb.DESCRIPTOR.services_by_name['EncoderService'].full_name}/Encode"


class EncoderClient:
    def __init__(self, address: str, timeout: float = 60.0, max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
                 security: ClientSecurity | None = None):
        """`security`: TLS / mTLS / bearer token; default from the environment (`ClientSecurity.from_env`)."""
        self.address, self.timeout = address, timeout
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
    ) -> wire.EncodeResult:
        """Encode `items` in one call. copy=False returns a read-only view of the received message
        (saves a copy for callers that copy rows out anyway, like the LLM worker's cache)."""
        request = pb.EncodeRequest(
            request_id=request_id or uuid.uuid4().hex, items=[wire.media_to_proto(i) for i in items]
        )
        response = self._encode(request, timeout=timeout or self.timeout, metadata=metadata)
        return wire.decode_response(response, copy=copy)

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
