"""The one front door: what every call passes through, whichever way it came in (the standalone gRPC
server, the Serve gRPC deployment, the Serve handle method).

- identity and tenant: who the call is (`security.Authenticator`: a verified bearer token, or a handle
  caller's named tenant) and so the cache namespace its rows are kept under;
- admission: requests or request bytes in flight over the limits are refused at once with `Busy`
  (UNAVAILABLE + `retry-after-ms`: retry later or on another replica) instead of queueing without bound;
  so is every call once the door drains (`drain`), while the calls in flight go on (`idle`);
- the deadline, as a time.monotonic() instant the model process honours;
- failures as statuses (`contract.wire.status`: code, message, details, retry-after), and metrics and
  counters for every outcome.
A door only adapts this to its transport: how a status is sent, how a deadline is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Iterator, Protocol

from encoder_service.contract.errors import Busy, Unavailable
from encoder_service.contract.wire.model_info import with_access
from encoder_service.contract.wire.responses import response_extras
from encoder_service.contract.wire.status import status_for
from encoder_service.serving.api.security import Authenticator, Identity


@dataclass
class EdgeLimits:
    # Admission: requests beyond these in flight are refused at once with UNAVAILABLE + retry-after-ms.
    max_inflight_request_bytes: int = 256 << 20
    max_inflight_requests: int = 128
    retry_after_ms: int = 200


@dataclass
class ServiceCounters:
    """What a door did: lets tests and operators see how often the encoder really ran."""

    encode_calls: int = 0
    items_encoded: int = 0
    tokens_out: int = 0
    errors: int = 0
    refused: int = 0  # turned away by admission control


class MetricsSink(Protocol):
    def record(self, code: str, seconds: float, stats: dict | None = None, items: int = 0, tokens: int = 0,
               nbytes: int = 0, serialize_s: float = 0.0) -> None: ...

    def refusal(self) -> None: ...


def deadline_in(seconds: float | None) -> float | None:
    """A time.monotonic() deadline `seconds` from now (None: none)."""
    return time.monotonic() + seconds if seconds else None


class Edge:
    def __init__(self, limits: EdgeLimits, metrics: MetricsSink, auth: Authenticator):
        self.limits, self.metrics, self.auth = limits, metrics, auth
        self.counters = ServiceCounters()
        self.inflight_requests = self.inflight_bytes = 0
        self.draining = False

    def identify(self, metadata) -> Identity:
        """A gRPC call's identity (raises Unauthenticated)."""
        return self.auth.identify(metadata)

    def identify_handle(self, tenant: str) -> Identity:
        """A Serve handle call's identity (raises Unauthenticated)."""
        return self.auth.identify_handle(tenant)

    def access(self, info_bytes: bytes) -> bytes:
        """GetModelInfo's answer with this door's access settings (shared cache, tokens required)."""
        return with_access(info_bytes, self.auth.shared_cache, self.auth.required)

    @contextlib.contextmanager
    def admitted(self, nbytes: int, started: float) -> Iterator[None]:
        """A call of `nbytes` request bytes in flight for the block; raises `Busy` over the limits. The gauges
        drop as the block ends, before any status goes out: a caller told of it sees them drop."""
        limits = self.limits
        if self.draining:
            self._refused(started)
            raise Unavailable("the server is shutting down (draining): retry on another replica")
        if (self.inflight_requests >= limits.max_inflight_requests
                or self.inflight_bytes + nbytes > limits.max_inflight_request_bytes):
            self._refused(started)
            raise Busy(f"encoder busy: {self.inflight_requests} requests ({self.inflight_bytes >> 20} MB) in flight; "
                       f"retry after {limits.retry_after_ms} ms or on another replica", limits.retry_after_ms)
        self.inflight_requests += 1
        self.inflight_bytes += nbytes
        try:
            yield
        finally:
            self.inflight_requests -= 1
            self.inflight_bytes -= nbytes

    def _refused(self, started: float) -> None:
        self.counters.refused += 1
        self.metrics.refusal()
        self.metrics.record("UNAVAILABLE", time.perf_counter() - started)

    def drain(self) -> None:
        """Refuse every new call from now on (UNAVAILABLE: retry on another replica); calls in flight go on."""
        self.draining = True

    async def idle(self, deadline: float) -> bool:
        """Wait until no call is in flight, or until time.monotonic() passes `deadline`; True when idle."""
        while self.inflight_requests and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not self.inflight_requests

    def succeeded(self, header: bytes, items: int, rows: int, started: float, nbytes: int,
                  serialize_s: float) -> None:
        """A call answered: `header` is its serialised response header (its extras carry the stage times)."""
        self.counters.encode_calls += 1
        self.counters.items_encoded += items
        self.counters.tokens_out += rows
        self.metrics.record("OK", time.perf_counter() - started, response_extras(header), items, rows, nbytes,
                            serialize_s)

    def failed(self, error: BaseException, started: float) -> None:
        """A call failed with `error` (its status: `status.status_for`). A refusal was counted already."""
        if isinstance(error, Busy):
            return
        self.counters.errors += 1
        self.metrics.record(status_for(error).name, time.perf_counter() - started)

    def cancelled(self, started: float) -> None:
        """The caller went away: no status to send."""
        self.metrics.record("CANCELLED", time.perf_counter() - started)
