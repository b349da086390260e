"""Client for the encoder pool behind Ray Serve's gRPC proxy: deadlines and retries.

Encode is idempotent, so a call that fails because a replica died or a proxy is
unreachable is retried (with backoff) through the next proxy address; the Serve
router sends it to a live replica. Errors that are the caller's (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED) are never retried.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

import grpc

from encoder_service.client import EncoderClient
from encoder_service.engine import ModelInfo
from encoder_service.processor import MediaInput
from encoder_service.wire import EncodeResult

log = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}


@dataclass
class PoolClientConfig:
    addresses: list[str]  # gRPC proxy address(es), host:port
    application: str = "encoder"  # Serve application name (routing metadata)
    attempt_timeout_s: float = 30.0  # deadline of one attempt
    total_timeout_s: float = 120.0  # deadline of the call, retries included
    max_attempts: int = 5
    backoff_s: float = 0.2  # first retry delay; doubles, with jitter
    retryable: set[grpc.StatusCode] = field(default_factory=lambda: set(RETRYABLE))


class PoolEncoderClient:
    def __init__(self, cfg: PoolClientConfig):
        if not cfg.addresses:
            raise ValueError("no encoder pool addresses")
        self.cfg = cfg
        self.clients = [EncoderClient(a, timeout=cfg.attempt_timeout_s) for a in cfg.addresses]
        self.metadata = (("application", cfg.application),) if cfg.application else None
        self.retries = 0
        self._next = 0

    def encode(self, items: list[MediaInput]) -> EncodeResult:
        return self._call(lambda c, timeout: c.encode(items, timeout=timeout, metadata=self.metadata))

    def model_info(self) -> ModelInfo:
        return self._call(lambda c, timeout: c.model_info(timeout=timeout, metadata=self.metadata))

    def _call(self, fn):
        deadline = time.monotonic() + self.cfg.total_timeout_s
        delay = self.cfg.backoff_s
        for attempt in range(1, self.cfg.max_attempts + 1):
            client = self.clients[self._next % len(self.clients)]
            remaining = deadline - time.monotonic()
            try:
                return fn(client, min(self.cfg.attempt_timeout_s, max(remaining, 0.001)))
            except grpc.RpcError as e:
                code = e.code()
                if code not in self.cfg.retryable or attempt == self.cfg.max_attempts:
                    raise
                if time.monotonic() + delay >= deadline:
                    raise
                log.warning("encoder call via %s failed (%s: %s); retry %d", client.address, code, e.details(), attempt)
                self.retries += 1
                self._next += 1  # next proxy, if there are several
                time.sleep(delay * (0.5 + random.random()))
                delay *= 2
        raise AssertionError("unreachable")

    def close(self) -> None:
        for c in self.clients:
            c.close()
