"""The model process's own side (`model_process` starts it): the pipeline, served over the pipe.

A reader (the main thread) takes messages; an admission thread parses requests and submits them to the
pipeline (output memory may have to wait for room: frees and cancels must not wait behind it); the
pipeline's own threads run the model and finish requests, whose answers go back as `messages.Answer`.

    python -m encoder_service.serving.host.model_child --config JSON --outputs-fd N --outputs-size BYTES \
        [--cache-fd N --cache-size BYTES]
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from encoder_service.config import EngineConfig
from encoder_service.contract.errors import FailedPrecondition, InvalidInput, Unavailable
from encoder_service.contract.result import running_offsets
from encoder_service.contract.wire.media import media_items_from_proto
from encoder_service.contract.wire.model_info import model_info_to_proto
from encoder_service.contract.wire.responses import item_to_proto, response_header
from encoder_service.contract.wire.status import as_failure, status_for
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.serving.host import child, messages
from encoder_service.serving.host.arena import SharedArena
from encoder_service.serving.host.pipeline import EncodePipeline, HeldRows, PipelineConfig
from encoder_service.serving.host.rows import OUTPUTS, Region

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Call:
    id: int
    encode: messages.Encode
    cancelled: bool = False
    items_released: bool = False  # the parent gave a streamed call's items back while it still ran
    future: Future | None = None


class StreamListener:
    """A streamed call's items, told to the parent as they are ready (`pipeline.ItemListener`); the server
    keeps each item's region until the parent sends ReleaseItems for the call."""

    def __init__(self, server: "ModelServer", call: _Call, request: pb.EncodeRequest):
        self.server, self.call, self.request = server, call, request
        self.offsets: list[int] = []

    def started(self, token_counts: list[int]) -> None:
        self.offsets = running_offsets(token_counts)
        self.server.reply(messages.StreamStarted(self.call.id, token_counts, self.server.model_contract,
                                                 self.request.request_id))

    def item(self, index: int, region: Region, cache_hit: bool) -> None:
        if not self.server.hold(self.call, region):
            return
        src = self.request.items[index]
        meta = item_to_proto(region.describe(self.offsets[index], cache_hit, src.item_id, src.content_hash))
        self.server.reply(messages.ItemReady(self.call.id, index, meta.SerializeToString(),
                                             self.server.segment(region)))


class ModelServer:
    """Serves the pipeline to the parent over a pipe."""

    def __init__(self, pipeline: EncodePipeline, out_fd: int):
        self.pipeline = pipeline
        self.model_contract = pipeline.engine.fingerprint.contract
        self._out = out_fd
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._answers: dict[int, HeldRows] = {}  # answers whose rows the parent still reads, by call id
        self._holds: dict[int, list[Region]] = {}  # streamed items' regions the parent still reads, by call id
        # Streamed calls until the parent's ReleaseItems (it sends one for every stream, however it ended): an
        # item the pipeline hands over after that, even once the call itself is done, goes straight back.
        self._streams: dict[int, _Call] = {}
        self._admissions: queue.Queue[_Call | None] = queue.Queue()
        self._admitter = threading.Thread(target=self._admit_loop, name="model-process-admission", daemon=True)
        self._admitter.start()

    def reply(self, message) -> None:
        with self._write_lock:
            messages.send(self._out, message)

    def segment(self, region: Region) -> messages.Segment:
        engine = self.pipeline.engine
        return region.arena, region.offset, region.rows * engine.hidden_size * engine.dtype.itemsize

    def hold(self, call: _Call, region: Region) -> bool:
        """Keep a streamed item's region (its reader) until the parent releases the call's items; False (and
        the region given back) when the parent stopped listening already."""
        with self._lock:
            late = call.items_released
            if not late:
                self._holds.setdefault(call.id, []).append(region)
        if late:
            self.pipeline.store.release(region)
        return not late

    def serve(self, in_fd: int) -> None:
        while (msg := messages.receive(in_fd)) is not None:
            if isinstance(msg, messages.Encode):
                call = _Call(msg.id, msg)
                with self._lock:
                    self._calls[call.id] = call
                    if msg.stream:
                        self._streams[call.id] = call
                self._admissions.put(call)
            elif isinstance(msg, messages.Cancel):
                with self._lock:
                    call = self._calls.get(msg.id)
                    if call is not None:
                        call.cancelled = True
                        future = call.future
                if call is not None and future is not None:
                    future.cancel()
            elif isinstance(msg, messages.Release):
                with self._lock:
                    held = self._answers.pop(msg.id, None)
                if held is not None:
                    self.pipeline.release(held)
            elif isinstance(msg, messages.ReleaseItems):
                with self._lock:
                    regions = self._holds.pop(msg.id, [])
                    if (call := self._streams.pop(msg.id, None)) is not None:
                        call.items_released = True
                for region in regions:
                    self.pipeline.store.release(region)
            elif isinstance(msg, messages.StatsQuery):
                self.reply(messages.Stats(msg.id, self.stats()))
        self._admissions.put(None)

    def stats(self) -> dict:
        pipeline = self.pipeline
        stats = {"outputs_in_use": pipeline.store.arenas[OUTPUTS].bytes_in_use,
                 "tiles_in_use": pipeline.arena.bytes_in_use,
                 "pending_vit_tokens": pipeline.pending_vit_tokens,
                 "jobs_started": pipeline.jobs_started,
                 "device_busy_s": pipeline.device_busy_s,
                 **{f"cache_{k}": v for k, v in pipeline.store.stats.as_dict().items()}}
        if pipeline.engine.device.type == "cuda":
            stats["gpu_memory_allocated"] = torch.cuda.memory_allocated(pipeline.engine.device)
            stats["gpu_memory_reserved"] = torch.cuda.memory_reserved(pipeline.engine.device)
        return stats

    def _admit_loop(self) -> None:
        while (call := self._admissions.get()) is not None:
            try:
                request = pb.EncodeRequest.FromString(call.encode.request)
            except Exception:  # noqa: BLE001 - protobuf's DecodeError
                self._fail(call, InvalidInput("malformed EncodeRequest"))
                continue
            try:
                self._check_rows(request, call.encode.stream)
                items = media_items_from_proto(request)
                listener = StreamListener(self, call, request) if call.encode.stream else None
                future = self.pipeline.submit(items, call.encode.deadline, call.encode.namespace, listener)
            except Exception as e:  # what headers reveal: the call fails, the process goes on
                self._fail(call, e)
                continue
            with self._lock:
                call.future = future
                cancelled = call.cancelled
            if cancelled:
                future.cancel()
            future.add_done_callback(lambda f, call=call, request=request: self._finished(call, request, f))

    def _check_rows(self, request: pb.EncodeRequest, stream: bool) -> None:
        """How the answer may carry the rows: a cache-only answer needs the cache, and is never streamed; a
        stream carries its rows inline (a by-reference request's too)."""
        if request.rows == pb.ROWS_INLINE or (request.rows == pb.ROWS_BY_REFERENCE and not stream):
            return
        if request.rows == pb.ROWS_BY_REFERENCE:
            request.rows = pb.ROWS_INLINE
            return
        if request.rows != pb.ROWS_CACHE_ONLY or stream:
            raise InvalidInput(f"rows mode {request.rows} is not supported here" + (" (EncodeStream carries rows "
                               "inline only)" if stream else ""))
        if self.pipeline.store.cache is None:
            raise FailedPrecondition("ROWS_CACHE_ONLY: this endpoint's embedding cache is off (cache_mb 0), so "
                                     "nothing would be kept")

    def _finished(self, call: _Call, request: pb.EncodeRequest, future: Future) -> None:
        if future.cancelled():
            self._fail(call, Unavailable("cancelled"))
            return
        if (error := future.exception()) is not None:
            self._fail(call, error)
            return
        held = future.result()
        try:
            extras = {**held.stats, "model": self.model_contract, **(call.encode.extras or {})}
            items = held.items([(m.item_id, m.content_hash) for m in request.items])
            header = response_header(request.request_id, items, held.dtype, held.hidden_size, extras, request.rows)
            # Inline and by reference, the rows stay held for the transport (which sends them, or leases them).
            inline = request.rows in (pb.ROWS_INLINE, pb.ROWS_BY_REFERENCE)
            answer = messages.Answer(call.id, header.SerializeToString(),
                                     [self.segment(r) for r in held.regions] if inline else [], len(request.items),
                                     held.shape[0] if inline else 0)
        except Exception as e:  # noqa: BLE001
            self.pipeline.release(held)
            self._fail(call, e)
            return
        if inline:
            with self._lock:
                self._answers[call.id] = held
        else:  # nothing to send: the rows go back now (cached ones stay in the cache)
            self.pipeline.release(held)
        self._done(call)
        self.reply(answer)

    def _fail(self, call: _Call, error: BaseException) -> None:
        if status_for(error).name == "INTERNAL":
            log.error("Encode failed", exc_info=error)
        self._done(call)
        self.reply(messages.Failure.of(call.id, as_failure(error)))

    def _done(self, call: _Call) -> None:
        with self._lock:
            self._calls.pop(call.id, None)


def main(argv: list[str] | None = None) -> int:
    args = child.child_args(("outputs", "cache"), argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s model-process %(message)s")
    in_fd, out_fd = child.child_pipes()
    config = args.config
    try:
        from encoder_service.engine import EncoderEngine

        if config.get("torch_threads"):
            torch.set_num_threads(config["torch_threads"])
        engine = EncoderEngine(EngineConfig(**config["engine"]))
        outputs = SharedArena(args.outputs_size, fd=args.outputs_fd)
        cache = SharedArena(args.cache_size, fd=args.cache_fd) if args.cache_fd is not None else None
        pipeline = EncodePipeline(engine, PipelineConfig(**config["pipeline"]), outputs=outputs, cache=cache)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it at start-up
        log.exception("could not start the encoder")
        messages.send(out_fd, messages.StartFailed(f"{type(e).__name__}: {e}"))
        return 1
    messages.send(out_fd, messages.Ready(model_info_to_proto(engine.info()).SerializeToString(),
                                         pipeline.outputs_pinned))
    server = ModelServer(pipeline, out_fd)
    try:
        server.serve(in_fd)
    finally:
        pipeline.close()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # daemon threads (dispatchers, completion) must not hold the exit up
