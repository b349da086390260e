"""Client for the encoder pool on Ray Serve: deadlines and retries, over either transport.

- `transport="grpc"`: Serve's gRPC proxy address(es), from anywhere;
- `transport="handle"`: a Serve DeploymentHandle, for callers inside the Ray cluster (LLM
  worker actors). The embedding tensor comes back through Ray's object store and is read in
  place on the same node: no protobuf, no socket.

Both transports report failures as `grpc.RpcError` with the same status codes; `retry.RetryPolicy`
decides what is retried (on the next proxy address, if there are several).

Content affinity (`affinity`): each item is its own call, keyed by its media digest (`session_id`),
so the pool's router sends it to the replica whose cache holds it; the calls run concurrently and
their rows are assembled into the one tensor a single call returns. With `probe`, items go by
digest first and their bytes only if the replica lacks them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import grpc

from encoder_service.client.by_reference import ReferenceRows, check_transfer
from encoder_service.client.endpoint import EncoderClient, RemoteCallError, probe_then_upload
from encoder_service.client.retry import PoisonMemory, RetryPolicy
from encoder_service.client.security import ClientSecurity
from encoder_service.contract.errors import EncodeFailed, PoisonInput
from encoder_service.contract.media import MediaInput, media_digest
from encoder_service.contract.model_info import ModelInfo
from encoder_service.contract.result import EncodeResult, ItemEmbedding, assemble, dtype_from_name
from encoder_service.contract.settings import from_mapping
from encoder_service.contract.wire.media import media_to_proto
from encoder_service.contract.wire.model_info import model_info_from_proto
from encoder_service.contract.wire.responses import decode_parts
from encoder_service.contract.wire.status import as_failure
from encoder_service.contract.wire.streams import StreamAssembler
from encoder_service.contract.wire.metadata import APPLICATION_KEY, ROUTING_KEY, TENANT_KEY
from encoder_service.proto import encoder_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class PoolClientConfig:
    addresses: list[str] = field(default_factory=list)  # gRPC proxy address(es), host:port ("grpc")
    application: str = "encoder"  # Serve application name
    transport: str = "grpc"  # "grpc" or "handle" (inside the Ray cluster)
    deployment: str = "EncoderDeployment"  # for "handle"
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # a dict of its fields in a config
    poison_ttl_s: float = 600.0  # media a replica declared poison are refused here this long (`retry.PoisonMemory`)
    affinity: bool = True  # one call per item, routed by its digest to the replica caching it
    probe: bool = True  # items by digest first, bytes only for those the replica lacks
    tenant: str = ""  # handle transport: the cache namespace (gRPC: derived from the bearer token)
    # gRPC: TCP connections per address; calls made at once (one per item with affinity, a stream's
    # items without) spread over them, since one connection moves only a few hundred MB/s.
    connections: int = 1
    # "nixl": rows by reference, read with NIXL straight from the replica's memory (`by_reference`; an
    # answer the replica gives inline, or a read that fails, falls back to rows in the answer); "bytes".
    transfer: str = "bytes"


@dataclass(frozen=True)
class Call:
    """How one call goes: its routing key (affinity: the item's digest), probe then upload, the caller's tenant
    (gRPC: a `tenant` header inside the token's namespace; handle: the tenant it names), where the rows go."""

    routing_key: str = ""
    probe: bool = False
    digests: list[str] | None = None
    tenant: str = ""
    rows: int = pb.ROWS_INLINE


class GrpcTransport:
    def __init__(self, address: str, application: str, timeout_s: float, connections: int = 1,
                 security: ClientSecurity | None = None):
        self.name = address
        self.client = EncoderClient(address, timeout=timeout_s, connections=connections, security=security)
        self.metadata = ((APPLICATION_KEY, application),) if application else ()

    def _metadata(self, call: Call) -> tuple[tuple[str, str], ...]:
        return (*self.metadata, *(((ROUTING_KEY, call.routing_key),) if call.routing_key else ()),
                *(((TENANT_KEY, call.tenant),) if call.tenant else ()))

    def encode(self, items: list[MediaInput], timeout_s: float, call: Call = Call()) -> EncodeResult:
        # copy=False: the caller copies rows into its cache anyway.
        return self.client.encode(items, timeout=timeout_s, metadata=self._metadata(call), copy=False,
                                  probe=call.probe, digests=call.digests, rows=call.rows)

    def encode_stream(self, items: list[MediaInput], timeout_s: float, on_item, call: Call = Call()) -> EncodeResult:
        # copy=False: the caller copies each item's rows into its cache as they arrive.
        return self.client.encode_stream(items, on_item, timeout=timeout_s, metadata=self._metadata(call), copy=False)

    def model_info(self, timeout_s: float) -> ModelInfo:
        return self.client.model_info(timeout=timeout_s, metadata=self.metadata)

    @property
    def generation(self) -> int:
        return self.client.generation

    def reconnect(self, generation: int) -> None:
        self.client.reconnect(generation)

    def close(self) -> None:
        self.client.close()


class ServeHandleTransport:
    """The pool through a Serve DeploymentHandle (`EncoderDeployment.encode_native`)."""

    def __init__(self, application: str, deployment: str, tenant: str = ""):
        from ray import serve

        self.name = f"handle:{application}/{deployment}"
        self.handle = serve.get_deployment_handle(deployment, app_name=application)
        # One router for every call, made here: handles create theirs on first use, and threads calling
        # at once would each make one (left running, unreachable by `close`).
        self.methods = {m: self.handle.options(method_name=m) for m in ("encode_native", "model_info_native")}
        self.methods["encode_stream_native"] = self.handle.options(method_name="encode_stream_native", stream=True)
        self.tenant = tenant

    def encode(self, items: list[MediaInput], timeout_s: float, call: Call = Call()) -> EncodeResult:
        def once(sent: list[MediaInput]) -> EncodeResult:
            request = pb.EncodeRequest(request_id=uuid.uuid4().hex, items=[media_to_proto(i) for i in sent],
                                       rows=call.rows)
            header, payload = self._result("encode_native", timeout_s, call.routing_key, request.SerializeToString(),
                                           timeout_s, call.tenant or self.tenant)
            return decode_parts(header, payload, copy=False)

        return probe_then_upload(once, items, call.digests) if call.probe else once(items)

    def encode_stream(self, items: list[MediaInput], timeout_s: float, on_item, call: Call = Call()) -> EncodeResult:
        """`encode` through `encode_stream_native`: items as they are ready, then the whole result."""
        request = pb.EncodeRequest(request_id=uuid.uuid4().hex, items=[media_to_proto(i) for i in items])
        stream = self.methods["encode_stream_native"].remote(request.SerializeToString(), timeout_s,
                                                             call.tenant or self.tenant)
        assembler = StreamAssembler(copy=False)  # as `encode`: the caller copies rows into its cache
        deadline = time.monotonic() + timeout_s
        with self._errors(timeout_s, stream):
            for event in stream:
                if event[0] == "start":
                    _, request_id, counts, model, dtype, hidden = event
                    assembler.start(request_id, dtype_from_name(dtype), hidden, counts, model)
                elif event[0] == "item":
                    _, index, metadata, rows = event
                    meta = pb.ItemMetadata.FromString(metadata)
                    for done in assembler.rows(index, meta, meta.offset, meta.token_count, rows):
                        on_item(done, *assembler.item(done), assembler.model)
                else:
                    assembler.end(pb.EncodeResponse.FromString(event[1]))
                if time.monotonic() > deadline:
                    raise TimeoutError
        return assembler.result()

    def model_info(self, timeout_s: float) -> ModelInfo:
        return model_info_from_proto(pb.ModelInfo.FromString(self._result("model_info_native", timeout_s, "")))

    def _result(self, method: str, timeout_s: float, routing_key: str, *args):
        handle = self.methods[method]
        response = (handle.options(session_id=routing_key) if routing_key else handle).remote(*args)
        with self._errors(timeout_s, response):
            return response.result(timeout_s=timeout_s)

    @contextlib.contextmanager
    def _errors(self, timeout_s: float, response):
        """Ray's and Serve's failures as the grpc.RpcError the gRPC transport would raise."""
        from ray import exceptions as ray_errors
        from ray.serve import exceptions as serve_errors

        try:
            yield
        except EncodeFailed as e:  # the replica's verdict, with the status the gRPC path would give
            raise RemoteCallError(grpc.StatusCode[e.code], e.message, e) from None
        except TimeoutError:
            response.cancel()
            raise RemoteCallError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout_s:.1f}s") from None
        except serve_errors.RequestCancelledError as e:
            raise RemoteCallError(grpc.StatusCode.CANCELLED, str(e)) from None
        except (ray_errors.RayError, serve_errors.BackPressureError, serve_errors.DeploymentUnavailableError,
                serve_errors.ReplicaUnavailableError) as e:  # backpressure and Ray's infrastructure: try again
            raise RemoteCallError(grpc.StatusCode.UNAVAILABLE, str(e)) from None

    generation = 0  # Ray's own connections: nothing to replace here

    def reconnect(self, generation: int) -> None:
        pass

    def close(self) -> None:
        """Stop the handle's router (its background tasks would outlive Serve otherwise)."""
        self.handle.shutdown()


class PoolEncoderClient:
    def __init__(self, cfg: PoolClientConfig, security: ClientSecurity | None = None):
        """`security`: TLS and the pool's token for the gRPC transport (default: from the environment)."""
        cfg.retry = from_mapping(RetryPolicy, cfg.retry, "PoolClientConfig.retry")
        self.cfg = cfg
        if cfg.transport == "handle":
            self.transports = [ServeHandleTransport(cfg.application, cfg.deployment, cfg.tenant)]
        elif cfg.transport == "grpc":
            if not cfg.addresses:
                raise ValueError("no encoder pool addresses")
            self.transports = [GrpcTransport(a, cfg.application, cfg.retry.attempt_timeout_s, cfg.connections,
                                             security) for a in cfg.addresses]
        else:
            raise ValueError(f"unknown transport {cfg.transport!r}; choose grpc or handle")
        self.retries = 0
        self._next = 0
        self._fanout = ThreadPoolExecutor(16, thread_name_prefix="pool-client") if cfg.affinity else None
        self.poison = PoisonMemory(cfg.poison_ttl_s)
        self.by_reference = ReferenceRows() if check_transfer(cfg.transfer) == "nixl" else None

    def encode(self, items: list[MediaInput], tenant: str = "", rows: int = pb.ROWS_INLINE,
               probe: Sequence[bool] | None = None, digests: Sequence[str] | None = None) -> EncodeResult:
        """One result for all `items`: with affinity, one call per item to the replica caching it (in
        parallel), assembled; else one call. `tenant`: the caller's tenant for these items (gRPC: inside the
        token's namespace; handle: instead of `PoolClientConfig.tenant`). `rows`: ROWS_CACHE_ONLY leaves the
        rows in the pool's cache (`upload`). `probe`: per item, whether to send it by digest first (default:
        `PoolClientConfig.probe` for all; a caller that knows an item is new saves the round trip). `digests`:
        the items' media digests, when the caller has them already."""
        digests = list(digests) if digests is not None else [media_digest(item.data) for item in items]
        probes = list(probe) if probe is not None else [self.cfg.probe] * len(items)

        def call(sent: list[MediaInput], key: str, probing: bool, sent_digests: list[str]) -> EncodeResult:
            """One call; rows asked by reference and read when the client reads by reference."""
            def once(mode: int) -> EncodeResult:
                how = Call(key, probing, sent_digests, tenant, mode)
                return self._call(lambda t, timeout: t.encode(sent, timeout, how), sent_digests)

            if rows != pb.ROWS_INLINE or self.by_reference is None:
                return once(rows)
            return self.by_reference.resolve(once(pb.ROWS_BY_REFERENCE), lambda: once(pb.ROWS_INLINE))

        if not self.cfg.affinity:
            return call(items, "", any(probes), digests)

        def one(index: int) -> EncodeResult:
            return call([items[index]], digests[index], probes[index], [digests[index]])

        if len(items) == 1:
            return one(0)
        return assemble(list(self._fanout.map(one, range(len(items)))), uuid.uuid4().hex)

    def upload(self, items: list[MediaInput], tenant: str = "", probe: Sequence[bool] | None = None,
               digests: Sequence[str] | None = None) -> list[ItemEmbedding]:
        """Put the items into the pool's cache (with `probe`, sent by digest first, their media only where a
        replica lacks them) and answer their metadata only: no rows travel back. A consumer that never sees
        the media (an LLM server's connector) fetches them later by digest, from the same replicas (the same
        routing key)."""
        return self.encode(items, tenant, pb.ROWS_CACHE_ONLY, probe, digests).items

    def encode_stream(self, items: list[MediaInput], on_item, tenant: str = "") -> EncodeResult:
        """`encode`, with `on_item(index, item, rows, model)` as each item's rows arrive (completion order;
        `item.offset` is meaningful in the returned result only). With affinity each item is its own call
        and arrives when that call returns; else one EncodeStream. A retried call does not announce an
        item twice."""
        announced: set[int] = set()
        lock = threading.Lock()

        def once(index: int, item, rows, model: str) -> None:
            with lock:
                if index in announced:
                    return
                announced.add(index)
            on_item(index, item, rows, model)

        digests = [media_digest(item.data) for item in items]
        if not self.cfg.affinity:
            call = Call("", False, digests, tenant)
            return self._call(lambda t, timeout: t.encode_stream(items, timeout, once, call), digests)

        def one(index: int) -> EncodeResult:
            call = Call(digests[index], self.cfg.probe, [digests[index]], tenant)
            part = self._call(lambda t, timeout: t.encode([items[index]], timeout, call), [digests[index]])
            once(index, part.items[0], part.embeddings, part.extras.get("model", ""))
            return part

        return assemble(list(self._fanout.map(one, range(len(items)))), uuid.uuid4().hex)

    def model_info(self) -> ModelInfo:
        return self._call(lambda t, timeout: t.model_info(timeout))

    def _call(self, fn, digests: list[str] = ()):
        """`fn(transport, timeout_s)` under the retry policy, each retry on the next transport; a call carrying
        media a replica declared poison (`digests`: of its items) is refused here without a try."""
        if (index := self.poison.poisoned(digests)) is not None:
            raise RemoteCallError(grpc.StatusCode.INVALID_ARGUMENT, f"item {index}: a replica of the pool found this "
                                  f"item crashes its workers; not sent again", as_failure(PoisonInput(
                                      "crashes the pool's workers", index)))

        def attempt(number: int, timeout_s: float):
            if number:  # a retry goes to the next proxy, and later calls stay there
                self.retries += 1
                self._next += 1
            transport = self.transports[self._next % len(self.transports)]
            generation = transport.generation
            try:
                return fn(transport, timeout_s)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # the connection may be a black hole
                    transport.reconnect(generation)
                raise

        try:
            return self.cfg.retry.run(attempt, "encoder pool call")
        except grpc.RpcError as e:
            self.poison.learn(e, digests)
            raise

    def close(self) -> None:
        for t in self.transports:
            t.close()
        if self._fanout is not None:
            self._fanout.shutdown(wait=False)

