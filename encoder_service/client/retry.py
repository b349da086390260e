"""The one retry policy of every client of the pool (the LLM worker's pool client, the vLLM connector, the
CLI, loadgen): what is retried, how long it waits, and what is final. Both transports (gRPC and the Serve
handle) report failures as `grpc.RpcError` with the same codes, so one policy covers both.

Encode is idempotent: a call that failed because a replica died, a proxy was unreachable or an attempt
ran out of time is retried, with jittered exponential backoff that honours the server's `retry-after-ms`,
on the next address (Serve routes it to a live replica).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                       grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED})


def retry_after_s(error: grpc.RpcError) -> float:
    """The server's `retry-after-ms` hint (a busy server sends one), in seconds."""
    metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in metadata or ():
        if key == "retry-after-ms":
            try:
                return max(0.0, float(value) / 1e3)
            except ValueError:
                return 0.0
    return 0.0


@dataclass
class RetryPolicy:
    attempt_timeout_s: float = 30.0  # deadline of one attempt
    total_timeout_s: float = 120.0  # deadline of the call, retries included
    max_attempts: int = 5
    backoff_s: float = 0.2  # first retry delay; doubles, with jitter
    retryable: frozenset[grpc.StatusCode] = field(default_factory=lambda: RETRYABLE)

    def should_retry(self, error: grpc.RpcError) -> bool:
        return error.code() in self.retryable

    def run(self, attempt: Callable[[int, float], T], what: str = "encoder call") -> T:
        """`attempt(number, timeout_s)` until it returns, a failure is final, or attempts or time run out
        (the last failure is raised). `number` counts from 0: callers rotate addresses by it."""
        deadline = time.monotonic() + self.total_timeout_s
        delay = self.backoff_s
        for number in range(self.max_attempts):
            remaining = deadline - time.monotonic()
            try:
                return attempt(number, min(self.attempt_timeout_s, max(remaining, 0.001)))
            except grpc.RpcError as e:
                if not self.should_retry(e) or number + 1 == self.max_attempts:
                    raise
                wait = max(delay * (0.5 + random.random()), retry_after_s(e))
                if time.monotonic() + wait >= deadline:
                    raise
                log.warning("%s failed (%s: %s); retry %d", what, e.code().name, e.details(), number + 1)
                time.sleep(wait)
                delay *= 2
        raise AssertionError("unreachable")
