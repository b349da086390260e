"""The one retry policy of every client of the pool (the LLM worker's pool client, the vLLM connector, the
CLI, loadgen): what is retried, on which replica, how long it waits, and what is final. Both transports
(gRPC and the Serve handle) report failures as `grpc.RpcError` with the same codes and details, so one
policy covers both.

| status                 | what it means here                                        | retried?                      |
|------------------------|-----------------------------------------------------------|-------------------------------|
| UNAVAILABLE            | replica busy (BUSY: `retry-after-ms`), draining, restarting, unreachable; a worker died | yes, next address, after max(backoff, retry-after) |
| CANCELLED              | not the caller's own cancellation: a draining server's    | yes, next address             |
| DEADLINE_EXCEEDED      | one attempt's deadline (`attempt_timeout_s`)              | yes, while the call's `total_timeout_s` lasts |
| ABORTED                | transient conflict                                        | yes                           |
| RESOURCE_EXHAUSTED     | the request is too large (the encoder's REQUEST_TOO_LARGE, or gRPC's message-size limit) | never |
| RESOURCE_EXHAUSTED     | without the encoder's details: Serve's backpressure       | yes, after backoff            |
| NOT_FOUND (CACHE_MISS) | items sent by digest the replica lacks                    | sent again with their media (`endpoint.probe_then_upload`), not here |
| INVALID_ARGUMENT       | bad input (POISON: an item that killed a worker twice)    | never                         |
| INTERNAL, UNKNOWN      | the encoder's (its details): a deterministic failure on that input | never (it would be resent to every replica) |
| INTERNAL               | without the encoder's details: Serve's proxy saw the replica die mid-call | yes, next address |
| UNAUTHENTICATED, others| configuration                                             | never                         |

Encode is idempotent: retrying after a replica died or a connection broke never duplicates work a caller
sees. Backoff is jittered exponential from `backoff_s`, at least the server's `retry-after-ms`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import grpc

from encoder_service.contract.wire.status import error_info, retry_after_s

log = logging.getLogger(__name__)

T = TypeVar("T")

ALWAYS_RETRIED = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.ABORTED})


def is_retryable(error: grpc.RpcError) -> bool:
    """The table above: whether another attempt (on another replica) may succeed."""
    code = error.code()
    if code in ALWAYS_RETRIED:
        return True
    # The encoder sends its details with every failure: without them, these come from the infrastructure in
    # between (Serve's proxy: its backpressure, a replica that died mid-call), never from the request itself
    # (but gRPC's own message-size limit).
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return error_info(error) is None and "larger than max" not in (error.details() or "")
    if code == grpc.StatusCode.INTERNAL:
        return error_info(error) is None
    return False


@dataclass
class RetryPolicy:
    attempt_timeout_s: float = 30.0  # deadline of one attempt
    total_timeout_s: float = 120.0  # deadline of the call, retries included
    max_attempts: int = 5
    backoff_s: float = 0.2  # first retry delay; doubles, with jitter

    def run(self, attempt: Callable[[int, float], T], what: str = "encoder call",
            on_retry: Callable[[grpc.RpcError], None] | None = None) -> T:
        """`attempt(number, timeout_s)` until it returns, a failure is final, or attempts or time run out
        (the last failure is raised). `number` counts from 0: callers move to the next address by it."""
        deadline = time.monotonic() + self.total_timeout_s
        delay = self.backoff_s
        for number in range(self.max_attempts):
            remaining = deadline - time.monotonic()
            try:
                return attempt(number, min(self.attempt_timeout_s, max(remaining, 0.001)))
            except grpc.RpcError as e:
                if not is_retryable(e) or number + 1 == self.max_attempts:
                    raise
                wait = max(delay * (0.5 + random.random()), retry_after_s(e))
                if time.monotonic() + wait >= deadline:
                    raise
                log.warning("%s failed (%s: %s); retry %d", what, e.code().name, e.details(), number + 1)
                if on_retry is not None:
                    on_retry(e)
                time.sleep(wait)
                delay *= 2
        raise AssertionError("unreachable")


class PoisonMemory:
    """Media a replica declared poison (they crashed its workers twice: INVALID_ARGUMENT, reason POISON),
    remembered by digest for `ttl_s`: this client refuses them at once instead of sending them to another
    replica to crash its workers too."""

    def __init__(self, ttl_s: float = 600.0):
        self.ttl_s = ttl_s
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def learn(self, error: grpc.RpcError, digests: Sequence[str]) -> None:
        """Remember the item an error names as poison (`digests`: of the call's items, in order)."""
        info = error_info(error)
        if info is None or info.reason != "POISON" or "item_index" not in info.metadata:
            return
        with self._lock:
            self._until[digests[int(info.metadata["item_index"])]] = time.monotonic() + self.ttl_s

    def poisoned(self, digests: Sequence[str]) -> int | None:
        """The index of the first remembered poison among `digests`, or None."""
        now = time.monotonic()
        with self._lock:
            self._until = {d: until for d, until in self._until.items() if until > now}
            return next((i for i, d in enumerate(digests) if d in self._until), None)
