"""Client for the encoder pool on Ray Serve: deadlines and retries, over either transport.

- `transport="grpc"`: Serve's gRPC proxy address(es), from anywhere;
- `transport="handle"`: a Serve DeploymentHandle, for callers inside the Ray cluster (LLM
  worker actors). The embedding tensor comes back through Ray's object store and is read in
  place on the same node: no protobuf, no socket.

Both transports report failures as `grpc.RpcError` with the same status codes, so one
retry policy covers both. Encode is idempotent: a call that fails because a replica died,
a proxy is unreachable or an attempt ran out of time is retried (with backoff) on the
next proxy address; Serve routes it to a live replica. Errors that are the caller's
(INVALID_ARGUMENT, RESOURCE_EXHAUSTED) are never retried.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass, field

import grpc

from encoder_service.engine import ModelInfo
from encoder_service.errors import EncodeFailed
from encoder_service.processor import MediaInput
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.serving import wire
from encoder_service.serving.api.client import EncoderClient
from encoder_service.serving.wire import EncodeResult

log = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}


@dataclass
class PoolClientConfig:
    addresses: list[str] = field(default_factory=list)  # gRPC proxy address(es), host:port ("grpc")
    application: str = "encoder"  # Serve application name
    transport: str = "grpc"  # "grpc" or "handle" (inside the Ray cluster)
    deployment: str = "EncoderDeployment"  # for "handle"
    attempt_timeout_s: float = 30.0  # deadline of one attempt
    total_timeout_s: float = 120.0  # deadline of the call, retries included
    max_attempts: int = 5
    backoff_s: float = 0.2  # first retry delay; doubles, with jitter
    retryable: set[grpc.StatusCode] = field(default_factory=lambda: set(RETRYABLE))


class RemoteCallError(grpc.RpcError):
    """A failed call on the Ray-native transport, shaped like a gRPC error (`code()`, `details()`)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class GrpcTransport:
    def __init__(self, address: str, application: str, timeout_s: float):
        self.name = address
        self.client = EncoderClient(address, timeout=timeout_s)
        self.metadata = (("application", application),) if application else None

    def encode(self, items: list[MediaInput], timeout_s: float) -> EncodeResult:
        # copy=False: the caller copies rows into its cache anyway.
        return self.client.encode(items, timeout=timeout_s, metadata=self.metadata, copy=False)

    def model_info(self, timeout_s: float) -> ModelInfo:
        return self.client.model_info(timeout=timeout_s, metadata=self.metadata)

    def close(self) -> None:
        self.client.close()


class ServeHandleTransport:
    """The pool through a Serve DeploymentHandle (`EncoderDeployment.encode_native`)."""

    def __init__(self, application: str, deployment: str):
        from ray import serve

        self.name = f"handle:{application}/{deployment}"
        self.handle = serve.get_deployment_handle(deployment, app_name=application)

    def encode(self, items: list[MediaInput], timeout_s: float) -> EncodeResult:
        request = pb.EncodeRequest(request_id=uuid.uuid4().hex, items=[wire.media_to_proto(i) for i in items])
        header, payload = self._result("encode_native", timeout_s, request.SerializeToString(), timeout_s)
        return wire.decode_parts(header, payload, copy=False)

    def model_info(self, timeout_s: float) -> ModelInfo:
        return wire.model_info_from_proto(pb.ModelInfo.FromString(self._result("model_info_native", timeout_s)))

    def _result(self, method: str, timeout_s: float, *args):
        from ray import exceptions as ray_errors
        from ray.serve import exceptions as serve_errors

        response = self.handle.options(method_name=method).remote(*args)
        try:
            return response.result(timeout_s=timeout_s)
        except EncodeFailed as e:  # the replica's verdict, with the status the gRPC path would give
            raise RemoteCallError(grpc.StatusCode[e.code], e.message) from None
        except TimeoutError:
            response.cancel()
            raise RemoteCallError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout_s:.1f}s") from None
        except serve_errors.RequestCancelledError as e:
            raise RemoteCallError(grpc.StatusCode.CANCELLED, str(e)) from None
        except (ray_errors.RayActorError, serve_errors.BackPressureError, serve_errors.DeploymentUnavailableError,
                serve_errors.ReplicaUnavailableError) as e:
            raise RemoteCallError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except ray_errors.RayError as e:
            raise RemoteCallError(grpc.StatusCode.INTERNAL, str(e)) from None

    def close(self) -> None:
        pass


class PoolEncoderClient:
    def __init__(self, cfg: PoolClientConfig):
        self.cfg = cfg
        if cfg.transport == "handle":
            self.transports = [ServeHandleTransport(cfg.application, cfg.deployment)]
        elif cfg.transport == "grpc":
            if not cfg.addresses:
                raise ValueError("no encoder pool addresses")
            self.transports = [GrpcTransport(a, cfg.application, cfg.attempt_timeout_s) for a in cfg.addresses]
        else:
            raise ValueError(f"unknown transport {cfg.transport!r}; choose grpc or handle")
        self.retries = 0
        self._next = 0

    def encode(self, items: list[MediaInput]) -> EncodeResult:
        return self._call(lambda t, timeout: t.encode(items, timeout))

    def model_info(self) -> ModelInfo:
        return self._call(lambda t, timeout: t.model_info(timeout))

    def _call(self, fn):
        deadline = time.monotonic() + self.cfg.total_timeout_s
        delay = self.cfg.backoff_s
        for attempt in range(1, self.cfg.max_attempts + 1):
            transport = self.transports[self._next % len(self.transports)]
            remaining = deadline - time.monotonic()
            try:
                return fn(transport, min(self.cfg.attempt_timeout_s, max(remaining, 0.001)))
            except grpc.RpcError as e:
                code = e.code()
                if code not in self.cfg.retryable or attempt == self.cfg.max_attempts:
                    raise
                if time.monotonic() + delay >= deadline:
                    raise
                log.warning("encoder call via %s failed (%s: %s); retry %d", transport.name, code, e.details(), attempt)
                self.retries += 1
                self._next += 1  # next proxy, if there are several
                time.sleep(max(delay * (0.5 + random.random()), _retry_after_s(e)))
                delay *= 2
        raise AssertionError("unreachable")

    def close(self) -> None:
        for t in self.transports:
            t.close()


def _retry_after_s(error: grpc.RpcError) -> float:
    """The server's `retry-after-ms` hint (a busy server sends one with UNAVAILABLE), in seconds."""
    metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in metadata or ():
        if key == "retry-after-ms":
            try:
                return max(0.0, float(value) / 1e3)
            except ValueError:
                return 0.0
    return 0.0
