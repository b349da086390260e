"""Blocking gRPC client of one encoder endpoint: a standalone server or a Ray Serve pool's gRPC proxy.

Probe, then upload (`probe=True`): items go first as their media digests alone; the server answers
cached items from its cache and names the others (NOT_FOUND, CACHE_MISS), which are then sent with
their bytes. A repeated image costs its digest (~80 bytes) instead of its file.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import grpc
import grpc.experimental
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from encoder_service.client.by_reference import ReferenceRows, check_transfer
from encoder_service.client.retry import RetryPolicy
from encoder_service.client.security import ClientSecurity
from encoder_service.contract.errors import EncodeFailed
from encoder_service.contract.media import MediaDigest, MediaInput, Modality, media_digest
from encoder_service.contract.model_info import ModelInfo
from encoder_service.contract.result import EncodeResult, ItemEmbedding, assemble
from encoder_service.contract.wire.channel import DEFAULT_MAX_MESSAGE_BYTES, channel_options
from encoder_service.contract.wire.media import media_to_proto
from encoder_service.contract.wire.metadata import APPLICATION_KEY
from encoder_service.contract.wire.model_info import model_info_from_proto
from encoder_service.contract.wire.responses import decode_response
from encoder_service.contract.wire.status import cache_misses_from_status, failure_from_rpc, status_trailers
from encoder_service.contract.wire.streams import StreamAssembler, parse_message
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.proto import encoder_pb2_grpc as pb_grpc
from encoder_service.transfer.nixl import NixlSettings

ENCODE_METHOD = f"/{pb.DESCRIPTOR.services_by_name['EncoderService'].full_name}/Encode"
ENCODE_STREAM_METHOD = f"/{pb.DESCRIPTOR.services_by_name['EncoderService'].full_name}/EncodeStream"
# An item's rows as they arrive on a stream: its index, metadata, rows (a view of the tensor being assembled)
# and the contract digest of the model that produced them (check it before using the rows).
OnItem = Callable[[int, ItemEmbedding, "torch.Tensor", str], None]


def by_digest(item: MediaInput, digest: str | None = None) -> MediaInput:
    """The item with its media replaced by the media's digest (options kept: they are part of the rows)."""
    return dataclasses.replace(item, data=MediaDigest(digest or media_digest(item.data)))


def probe_then_upload(call: Callable[[list[MediaInput]], EncodeResult], items: list[MediaInput],
                      digests: Sequence[str] | None = None) -> EncodeResult:
    """`call` with every item by digest; items the server lacks are sent again with their media. Entries
    evicted between the two calls are uploaded on a third; an item already sent by digest stays so."""
    digests = digests or [media_digest(item.data) for item in items]
    sent = [item if isinstance(item.data, MediaDigest) else by_digest(item, d) for item, d in zip(items, digests)]
    for _ in range(3):
        try:
            return call(sent)
        except grpc.RpcError as e:
            missing = cache_misses_from_status(e)
            if not missing or all(sent[i] is items[i] for i in missing):
                raise
            for i in missing:
                sent[i] = items[i]
    return call(sent)


class RemoteCallError(grpc.RpcError):
    """A failure raised here rather than by a gRPC call (the Ray-native transport, a request split over
    connections), shaped like a gRPC error: `code()`, `details()` and the same `trailing_metadata()`
    status details (`status.status_trailers`)."""

    def __init__(self, code: grpc.StatusCode, details: str, failure: EncodeFailed | None = None):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details
        self._trailers = status_trailers(failure) if failure is not None else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return self._trailers


def _renumbered(error: grpc.RpcError, indices: list[int]) -> grpc.RpcError:
    """A failure of a call that carried items `indices` of a request, naming them by their request index."""
    failure = failure_from_rpc(error)
    if failure.item_index is None:
        return error
    local = failure.item_index
    failure.message = failure.message.replace(f"item {local} ('{failure.item_id}')",
                                              f"item {indices[local]} ('{failure.item_id}')", 1)
    failure.item_index = indices[local]
    failure.missing = [(indices[i], "") for i, _ in failure.missing]
    return RemoteCallError(error.code(), failure.message, failure)


# While waiting for readiness, these mean "not yet" (no server, app not deployed, no replica up yet).
NOT_READY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED)


class EncoderClient:
    def __init__(self, address: str, timeout: float = 60.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 security: ClientSecurity | None = None, probe: bool = False, application: str = "",
                 extra_options: Sequence[tuple[str, int | str]] = (), connections: int = 1,
                 retry: RetryPolicy | None = None, transfer: str = "bytes", nixl: NixlSettings | None = None):
        """`address`: a standalone server or a Ray Serve pool's gRPC proxy (host:port).
        `security`: TLS / mTLS / bearer token; default from the environment (`ClientSecurity.from_env`).
        `probe`: send items by digest first, their media only if the server lacks them.
        `application`: the Serve application to reach through a proxy serving several (gRPC metadata).
        `connections`: TCP connections to spread over: `encode_stream` deals a request's items over them
        (one call each, round-robin), and `encode` calls take them in turn (calls made at once from
        several threads, e.g. one per item, move in parallel): one gRPC connection moves a few hundred
        MB/s, so large answers arrive sooner over several (bench/RESULTS.md, progressive_prefill). The
        calls may be batched apart, so rows can differ from a one-call answer by floating-point rounding.
        `retry`: `encode` retries under this policy (`client.retry`); None: one attempt.
        `transfer`: "nixl" asks `encode`'s rows by reference and reads them with NIXL (`by_reference`; `nixl`:
        this process's UCX settings), falling back to rows inline; "bytes": rows in the answer."""
        self.address, self.timeout, self.probe, self.retry = address, timeout, probe, retry
        self.by_reference = ReferenceRows(nixl) if check_transfer(transfer) == "nixl" else None
        self.retries = 0  # attempts `retry` made after a failure
        self.metadata: tuple[tuple[str, str], ...] = ((APPLICATION_KEY, application),) if application else ()
        self.bytes_sent = 0  # serialised EncodeRequest bytes (what probing saves)
        security = security if security is not None else ClientSecurity.from_env()
        options = channel_options(max_message_bytes) + list(extra_options)
        # Streams read on the calling thread, as unary calls are: by default gRPC hands every stream message
        # over from its channel thread, which made moving the same bytes as a stream several times slower than
        # as one unary answer (bench.grpc_transport, modes stream vs stream-handoff; bench/RESULTS.md).
        options.append((grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1))
        # A private subchannel pool per channel: channels sharing the global pool would share one connection,
        # and `reconnect` could not replace a dead one.
        options.append(("grpc.use_local_subchannel_pool", 1))
        self._security, self._options, self._connections = security, options, max(1, connections)
        self._turns = itertools.count()  # which connection the next `encode` call takes (atomic under the GIL)
        self._lock = threading.Lock()
        self.generation = 0  # bumped by each `reconnect`
        self._retired: list[grpc.Channel] = []  # replaced channels, closed with the client
        self._connect()

    def _connect(self) -> None:
        self.channels = [self._security.channel(self.address, self._options) for _ in range(self._connections)]
        self.channel = self.channels[0]
        self.stub = pb_grpc.EncoderServiceStub(self.channel)
        # Responses arrive as bytes and are parsed in place (`decode_response`).
        self._encodes = [channel.unary_unary(ENCODE_METHOD, request_serializer=pb.EncodeRequest.SerializeToString)
                         for channel in self.channels]
        # Stream messages arrive as bytes too: their rows are read in place (`streams.parse_message`).
        self._streams = [channel.unary_stream(ENCODE_STREAM_METHOD, request_serializer=pb.EncodeRequest.SerializeToString)
                         for channel in self.channels]

    def reconnect(self, generation: int) -> None:
        """New connections in place of those of `generation` (once, however many callers saw them fail). An
        attempt that ran out of time may have been on a connection that silently stopped carrying bytes (a
        black hole: gRPC would keep using it); calls still on the old channels finish or fail there."""
        with self._lock:
            if generation != self.generation:
                return
            self.generation += 1
            self._retired.extend(self.channels)
            self._connect()

    def encode(
        self,
        items: list[MediaInput],
        request_id: str | None = None,
        timeout: float | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
        copy: bool = True,
        probe: bool | None = None,
        digests: Sequence[str] | None = None,
        rows: int = pb.ROWS_INLINE,
    ) -> EncodeResult:
        """Encode `items` in one call (two with `probe` when some are not cached). copy=False returns a
        read-only view of the received message (saves a copy for callers that copy rows out anyway, like
        the LLM worker's cache). `digests`: the items' media digests, if the caller has them. `rows`:
        ROWS_CACHE_ONLY puts the items into the endpoint's cache and answers their metadata only;
        ROWS_BY_REFERENCE answers where the rows are (`result.reference`) for the caller to read."""
        request_id = request_id or uuid.uuid4().hex
        probe = self.probe if probe is None else probe
        if rows == pb.ROWS_INLINE and self.by_reference is not None:
            result = self._encode(items, request_id, timeout, metadata, copy, probe, digests, pb.ROWS_BY_REFERENCE)
            return self.by_reference.resolve(result, lambda: self._encode(items, request_id, timeout, metadata, copy,
                                                                          probe, digests, rows))
        return self._encode(items, request_id, timeout, metadata, copy, probe, digests, rows)

    def _encode(self, items, request_id, timeout, metadata, copy, probe, digests, rows) -> EncodeResult:
        def attempt(number: int, attempt_timeout: float) -> EncodeResult:
            generation = self.generation

            def call(sent: list[MediaInput]) -> EncodeResult:
                request = pb.EncodeRequest(request_id=request_id, items=[media_to_proto(i) for i in sent], rows=rows)
                self.bytes_sent += request.ByteSize()
                method = self._encodes[next(self._turns) % len(self._encodes)]
                return decode_response(
                    method(request, timeout=attempt_timeout, metadata=self.metadata + tuple(metadata or ())), copy=copy)

            self.retries += number > 0
            try:
                return probe_then_upload(call, items, digests) if probe else call(items)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self.retry is not None:
                    self.reconnect(generation)
                raise

        timeout = timeout or self.timeout
        if self.retry is None:
            return attempt(0, timeout)
        return dataclasses.replace(self.retry, total_timeout_s=timeout).run(attempt, f"Encode at {self.address}")

    def encode_stream(
        self,
        items: list[MediaInput],
        on_item: OnItem | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
        probe: bool | None = None,
        digests: Sequence[str] | None = None,
        copy: bool = True,
    ) -> EncodeResult:
        """`encode` through EncodeStream: `on_item(index, item, rows, model)` as each item's rows arrive (in
        completion order), then the same result `encode` gives (bit for bit over one connection). A
        stream cut short raises `streams.IncompleteStream`; a failure raises the grpc.RpcError `encode`
        would, naming the item by its index in `items`. `copy=False` as for `encode`: an answer that
        arrives in one message stays a read-only view of it (`StreamAssembler`)."""
        request_id = request_id or uuid.uuid4().hex
        probe = self.probe if probe is None else probe
        digests = digests or ([media_digest(item.data) for item in items] if probe else None)
        lanes = min(len(self._streams), len(items))
        if lanes <= 1:
            return self._stream_call(self._streams[0], items, on_item, request_id, timeout, metadata, probe, digests,
                                     copy)
        groups = [list(range(k, len(items), lanes)) for k in range(lanes)]

        def lane(k: int) -> EncodeResult:  # copy=False: `assemble` copies the lanes into one tensor
            group = groups[k]
            relay = None if on_item is None else (lambda j, *rest: on_item(group[j], *rest))
            return self._stream_call(self._streams[k], [items[i] for i in group], relay, f"{request_id}/{k}", timeout,
                                     metadata, probe, [digests[i] for i in group] if digests else None, copy=False)

        with ThreadPoolExecutor(lanes, thread_name_prefix="encode-lane") as pool:
            futures = [pool.submit(lane, k) for k in range(lanes)]
            parts = []
            for group, future in zip(groups, futures):
                try:
                    parts.append(future.result())
                except grpc.RpcError as e:
                    raise _renumbered(e, group) from None
        return assemble(parts, request_id, groups)

    def _stream_call(self, stream, items, on_item, request_id, timeout, metadata, probe, digests,
                     copy: bool) -> EncodeResult:
        def call(sent: list[MediaInput]) -> EncodeResult:
            request = pb.EncodeRequest(request_id=request_id, items=[media_to_proto(i) for i in sent])
            self.bytes_sent += request.ByteSize()
            responses = stream(request, timeout=timeout or self.timeout, metadata=self.metadata + tuple(metadata or ()))
            assembler = StreamAssembler(copy=copy)
            try:
                for message in responses:
                    for index in assembler.add(*parse_message(message)):
                        if on_item is not None:
                            on_item(index, *assembler.item(index), assembler.model)
            except BaseException:
                responses.cancel()
                raise
            return assembler.result()

        return probe_then_upload(call, items, digests) if probe else call(items)

    def model_info(self, timeout: float | None = None, metadata=None) -> ModelInfo:
        msg = self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout or self.timeout,
                                     metadata=self.metadata + tuple(metadata or ()))
        return model_info_from_proto(msg)

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
        for channel in self.channels + self._retired:
            channel.close()

    def __enter__(self) -> "EncoderClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def image_file(path: str | Path, item_id: str | None = None) -> MediaInput:
    """An image file as a MediaInput (bytes are sent as-is; the server decodes)."""
    path = Path(path)
    return MediaInput(Modality.IMAGE, path.read_bytes(), item_id=item_id or path.name)
