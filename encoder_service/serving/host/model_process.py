"""The model in a process of its own; the transports (gRPC server, Ray replica) run in the parent.

Why: sending a 31 MB response holds the GIL where nothing can interrupt it (gRPC's Cython layer
copies every message into a slice on the event loop; Ray pickles what a replica returns), and
the event loop runs Python besides. In the model's process each of those holds stalls the ~500
kernel launches of a batch: on the H100 the gRPC server delivered 0.84x of the engine's packed
throughput while the Ray handle path, without those copies, reached 0.96x. Here the model thread
shares its process only with the pipeline's light threads.

What crosses the boundary:
- requests as serialised `EncodeRequest` bytes (the protobuf is the codec; the child parses and
  validates them, so a malformed request fails there with its gRPC status);
- small msgpack control frames over a pipe (`framing.py`; never pickle);
- the embeddings through shared arenas (`arena.py`, `rows.py`: the outputs arena and the cache
  arena) that the device writes each item's rows into (page-locked in the child); a reply names
  each item's segment, the parent reads them in place and gives the response back with `release`
  once it is on the wire (cached rows stay in the cache).

Every `encode` frame gets exactly one reply. If the child dies, every pending call fails with
UNAVAILABLE (retryable) and `alive` turns false; the child exits when the parent does (its pipe
closes).

    python -m encoder_service.serving.host.model_process --config JSON --outputs-fd N --outputs-size BYTES \
        [--cache-fd N --cache-size BYTES]   (child)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Callable

import torch

from encoder_service.config import EngineConfig
from encoder_service.engine import running_offsets
from encoder_service.errors import EncodeFailed, InvalidInput, Unavailable
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.serving import wire
from encoder_service.serving.host.arena import SharedArena
from encoder_service.serving.host.framing import read_frame, write_frame
from encoder_service.serving.host.pipeline import PipelineConfig, cache_arena
from encoder_service.serving.host.rows import CACHE, OUTPUTS

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # loading a large checkpoint onto a device


@dataclass
class Encoded:
    """A finished Encode whose rows are still in the shared arenas (until `ModelProcess.release`)."""

    id: int
    header: bytes  # serialised EncodeResponse without the tensor's bytes (`wire.response_header`)
    segments: list[torch.Tensor]  # each item's rows as flat uint8 views of the arenas, in item order
    items: int
    rows: int

    @property
    def nbytes(self) -> int:
        return sum(s.numel() for s in self.segments)

    def response_bytes(self) -> bytes:
        """The whole serialised EncodeResponse (one GIL-free copy out of the arenas)."""
        return wire.response_bytes(pb.EncodeResponse.FromString(self.header), self.segments)

    def gather(self) -> torch.Tensor:
        """The tensor's bytes as one flat uint8 tensor of the caller's own (one copy)."""
        return torch.cat(self.segments) if self.segments else torch.empty(0, dtype=torch.uint8)


@dataclass
class StreamEvent:
    """A streamed call's progress: its start (every item's row count, the model's contract digest), or one
    item ready (its serialised ItemMetadata and its rows as flat uint8 in the arena, held for the caller)."""

    call: int
    token_counts: list[int] | None = None
    model: str = ""
    request_id: str = ""
    index: int = -1
    metadata: bytes = b""
    rows: torch.Tensor | None = None


class ModelProcess:
    """Starts the child and is its only client: `submit` serialised requests, `release` their rows."""

    def __init__(self, engine: EngineConfig, pipeline: PipelineConfig | None = None, torch_threads: int = 0,
                 on_exit: Callable[[], None] | None = None):
        pipeline = pipeline or PipelineConfig()
        self.arenas = {OUTPUTS: SharedArena(pipeline.output_arena_mb << 20, "encoder-outputs")}
        if (cache := cache_arena(pipeline)) is not None:
            self.arenas[CACHE] = cache
        self._arena_bytes = {k: torch.frombuffer(a.buf, dtype=torch.uint8) for k, a in self.arenas.items()}
        config = {"engine": dataclasses.asdict(engine), "pipeline": dataclasses.asdict(pipeline),
                  "torch_threads": torch_threads}
        args = [sys.executable, "-m", "encoder_service.serving.host.model_process", "--config", json.dumps(config)]
        for name, arena in (("outputs", self.arenas[OUTPUTS]), ("cache", self.arenas.get(CACHE))):
            if arena is not None:
                args += [f"--{name}-fd", str(arena.fd), f"--{name}-size", str(arena.size)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                     pass_fds=tuple(a.fd for a in self.arenas.values()))
        self._in, self._out = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        ready = self._wait_ready()
        self.info_bytes: bytes = ready["info"]
        self.info = wire.model_info_from_proto(pb.ModelInfo.FromString(self.info_bytes))
        self.outputs_pinned: bool = ready["outputs_pinned"]  # the device copies rows straight into the arenas
        self._on_exit = on_exit
        self._ids = itertools.count()
        self._pending: dict[int, Future] = {}
        self._streams: dict[int, Callable[[StreamEvent], None]] = {}  # streamed calls' event callbacks
        self._lock = threading.Lock()  # guards _pending, _streams and writes to the pipe
        self.alive = True
        self._reader = threading.Thread(target=self._read_replies, name="model-process-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self) -> dict:
        ready, _, _ = select.select([self._out], [], [], START_TIMEOUT_S)
        msg = read_frame(self._out) if ready else None
        if not msg or not msg.get("ready"):
            reason = msg.get("error") if msg else f"exited with code {self.proc.poll()} (its log is above)"
            self._kill()
            raise RuntimeError(f"the encoder model process did not start: {reason}")
        return msg

    # ------------------------------------------------------------------ calls

    def submit(self, request: bytes, deadline: float | None = None, extras: dict[str, Any] | None = None,
               namespace: str = "", on_event: Callable[[StreamEvent], None] | None = None) -> Future[Encoded]:
        """Encode a serialised EncodeRequest; `deadline` is a time.monotonic() instant (the clock is
        shared by the processes of one host); `namespace` keeps cache entries apart (a tenant).
        Cancelling the future drops the request's work. Failures arrive as EncodeFailed carrying the
        gRPC status name. `on_event` (streaming): called on the reader thread with the request's start
        and then each item as its rows are ready, before the future resolves; every item event holds
        the item's rows until `release_items` (call it once the call is over, whatever its outcome)."""
        future, call = self._call({"op": "encode", "request": request, "deadline": deadline, "extras": extras,
                                   "namespace": namespace, "stream": on_event is not None}, on_event)
        future.add_done_callback(lambda f: f.cancelled() and self._send({"op": "cancel", "id": call}))
        future.call_id = call  # type: ignore[attr-defined]
        return future

    def release(self, encoded: Encoded) -> None:
        """Give a finished request's rows back; `encoded.segments` must not be read afterwards."""
        self._send({"op": "release", "id": encoded.id})

    def release_items(self, call: int) -> None:
        """Give back the rows every item event of a streamed call held (their segments must not be read
        afterwards), and stop its events."""
        with self._lock:
            self._streams.pop(call, None)
        self._send({"op": "release_items", "id": call})

    def stats(self, timeout: float = 10.0) -> dict[str, int]:
        """Bytes in use in the child's arenas (tests and metrics: nothing may leak), its cache, the ViT
        tokens of its unfinished work (autoscaling) and its GPU memory."""
        return self._call({"op": "stats"})[0].result(timeout)

    def _call(self, message: dict, on_event: Callable[[StreamEvent], None] | None = None) -> tuple[Future, int]:
        """Send a message that the child answers once (by its id); the future resolves with the answer."""
        future: Future = Future()
        with self._lock:
            if not self.alive:
                raise Unavailable("the encoder model process is not running")
            call = next(self._ids)
            self._pending[call] = future
            if on_event is not None:
                self._streams[call] = on_event
            try:
                write_frame(self._in, {**message, "id": call})
            except OSError:
                del self._pending[call]
                raise Unavailable("the encoder model process is not running") from None
        return future, call

    def _send(self, message: dict) -> None:
        with self._lock:
            if self.alive:
                try:
                    write_frame(self._in, message)
                except OSError:  # the child is gone; the reader fails what is pending
                    pass

    # ------------------------------------------------------------------ replies

    def _read_replies(self) -> None:
        while (msg := read_frame(self._out)) is not None:
            if "event" in msg:
                self._stream_event(msg)
                continue
            with self._lock:
                future = self._pending.pop(msg["id"], None)
                self._streams.pop(msg["id"], None)
            if "stats" in msg:
                future.set_result(msg["stats"])
            elif msg["ok"]:
                segments = [self._arena_bytes[arena][offset : offset + nbytes] for arena, offset, nbytes in msg["segments"]]
                encoded = Encoded(msg["id"], msg["header"], segments, msg["items"], msg["rows"])
                try:
                    if future is None:
                        raise InvalidStateError("no caller")
                    future.set_result(encoded)
                except InvalidStateError:  # cancelled meanwhile: nobody will read the rows
                    self.release(encoded)
            elif future is not None:
                try:
                    future.set_exception(EncodeFailed(msg["code"], msg["message"], msg.get("item_index"),
                                                      msg.get("item_id", ""), [tuple(m) for m in msg.get("missing", [])]))
                except InvalidStateError:
                    pass
        code = self.proc.wait()
        with self._lock:
            if self.alive:  # not closed by us
                log.error("the encoder model process exited (code %s)", code)
            self.alive = False
            pending, self._pending = list(self._pending.values()), {}
        for future in pending:
            try:
                future.set_exception(EncodeFailed("UNAVAILABLE", "the encoder model process exited; retry elsewhere"))
            except InvalidStateError:
                pass
        if self._on_exit is not None:
            self._on_exit()

    def _stream_event(self, msg: dict) -> None:
        with self._lock:
            on_event = self._streams.get(msg["id"])
        if msg["event"] == "started":
            event = StreamEvent(msg["id"], token_counts=msg["counts"], model=msg["model"],
                                request_id=msg["request_id"])
        else:
            arena, offset, nbytes = msg["segment"]
            event = StreamEvent(msg["id"], index=msg["index"], metadata=msg["meta"],
                                rows=self._arena_bytes[arena][offset : offset + nbytes])
        if on_event is not None:
            on_event(event)

    # ------------------------------------------------------------------ lifecycle

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the child (closing its pipe lets it finish and exit) and unmap the arena."""
        with self._lock:
            self.alive = False
            self._on_exit = None
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._kill()
        self._reader.join(timeout=5)
        self.proc.stdout.close()
        for arena in self.arenas.values():
            arena.close()

    def _kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


# ---------------------------------------------------------------------- the child


@dataclass(eq=False)
class _Call:
    id: int
    request: bytes
    deadline: float | None
    extras: dict | None
    namespace: str = ""
    stream: bool = False
    cancelled: bool = False
    items_released: bool = False  # the parent gave a streamed call's items back while it still ran
    future: Future | None = None


class _StreamListener:
    """A streamed call's items, told to the parent as they are ready; each keeps a reader of its region
    until the parent sends `release_items` for the call."""

    def __init__(self, child: "_Child", call: _Call, request: pb.EncodeRequest):
        self.child, self.call, self.request = child, call, request
        self.offsets: list[int] = []

    def started(self, token_counts: list[int]) -> None:
        self.offsets = running_offsets(token_counts)
        self.child._reply({"id": self.call.id, "event": "started", "counts": token_counts,
                           "model": self.child.pipeline.engine.fingerprint.contract,
                           "request_id": self.request.request_id})

    def item(self, index: int, region, cache_hit: bool) -> None:
        with self.child._lock:
            late = self.call.items_released  # the parent stopped listening: nobody will read these rows
            if not late:
                self.child._holds.setdefault(self.call.id, []).append(region)
        if late:
            self.child.pipeline.store.release(region)
            return
        engine = self.child.pipeline.engine
        meta = wire.item_metadata(self.request.items[index], region.rows, self.offsets[index], region.num_tiles,
                                  region.tokens_per_frame, region.frames, region.digest, cache_hit)
        nbytes = region.rows * engine.hidden_size * engine.dtype.itemsize
        self.child._reply({"id": self.call.id, "event": "item", "index": index, "meta": meta.SerializeToString(),
                           "segment": (region.arena, region.offset, nbytes)})


class _Child:
    """The child's side: a reader (this thread), an admission thread (output memory may have to
    wait for room; frees and cancels must not wait behind it) and the pipeline's own threads."""

    def __init__(self, pipeline, out_fd: int):
        self.pipeline = pipeline
        self._out = out_fd
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._responses: dict[int, Any] = {}  # replies whose rows the parent still reads, by call id
        self._holds: dict[int, list] = {}  # streamed items' regions the parent still reads, by call id
        self._admissions: queue.Queue[_Call | None] = queue.Queue()
        self._admitter = threading.Thread(target=self._admit_loop, name="model-process-admission", daemon=True)
        self._admitter.start()

    def _reply(self, message: dict) -> None:
        with self._write_lock:
            write_frame(self._out, message)

    def serve(self, in_fd: int) -> None:
        while (msg := read_frame(in_fd)) is not None:
            op = msg["op"]
            if op == "encode":
                call = _Call(msg["id"], msg["request"], msg["deadline"], msg["extras"], msg.get("namespace", ""),
                             msg.get("stream", False))
                with self._lock:
                    self._calls[call.id] = call
                self._admissions.put(call)
            elif op == "cancel":
                with self._lock:
                    call = self._calls.get(msg["id"])
                    if call is not None:
                        call.cancelled = True
                        future = call.future
                if call is not None and future is not None:
                    future.cancel()
            elif op == "release":
                with self._lock:
                    encoding = self._responses.pop(msg["id"], None)
                if encoding is not None:
                    self.pipeline.release(encoding)
            elif op == "release_items":
                with self._lock:
                    held = self._holds.pop(msg["id"], [])
                    if (call := self._calls.get(msg["id"])) is not None:
                        call.items_released = True
                for region in held:
                    self.pipeline.store.release(region)
            elif op == "stats":
                store = self.pipeline.store
                stats = {"outputs_in_use": store.arenas[OUTPUTS].bytes_in_use,
                         "tiles_in_use": self.pipeline.arena.bytes_in_use,
                         "pending_vit_tokens": self.pipeline.pending_vit_tokens,
                         "jobs_started": self.pipeline.jobs_started,
                         "device_busy_s": self.pipeline.device_busy_s,
                         **{f"cache_{k}": v for k, v in dataclasses.asdict(store.stats).items()}}
                if self.pipeline.engine.device.type == "cuda":
                    stats["gpu_memory_allocated"] = torch.cuda.memory_allocated(self.pipeline.engine.device)
                    stats["gpu_memory_reserved"] = torch.cuda.memory_reserved(self.pipeline.engine.device)
                self._reply({"id": msg["id"], "stats": stats})
        self._admissions.put(None)

    def _admit_loop(self) -> None:
        while (call := self._admissions.get()) is not None:
            try:
                request = pb.EncodeRequest.FromString(call.request)
            except Exception:  # noqa: BLE001 - protobuf's DecodeError
                self._fail(call, InvalidInput("malformed EncodeRequest"))
                continue
            try:
                items = wire.media_items_from_proto(request)
                listener = _StreamListener(self, call, request) if call.stream else None
                future = self.pipeline.submit(items, call.deadline, call.namespace, listener)
            except Exception as e:  # what headers reveal: the call fails, the process goes on
                self._fail(call, e)
                continue
            with self._lock:
                call.future = future
                cancelled = call.cancelled
            if cancelled:
                future.cancel()
            future.add_done_callback(lambda f, call=call, request=request: self._finished(call, request, f))

    def _finished(self, call: _Call, request: pb.EncodeRequest, future: Future) -> None:
        if future.cancelled():
            self._fail(call, Unavailable("cancelled"))
            return
        if (error := future.exception()) is not None:
            self._fail(call, error)
            return
        out = future.result()
        try:
            extras = {**out.stats, "model": self.pipeline.engine.fingerprint.contract, **(call.extras or {})}
            header = wire.response_header(request, out, extras)
            reply = {"id": call.id, "ok": True, "header": header.SerializeToString(), "segments": out.segments(),
                     "items": len(request.items), "rows": out.shape[0]}
        except Exception as e:  # noqa: BLE001
            self.pipeline.release(out)
            self._fail(call, e)
            return
        with self._lock:
            self._responses[call.id] = out
        self._done(call)
        self._reply(reply)

    def _fail(self, call: _Call, error: BaseException) -> None:
        code = wire.status_for(error).name
        if code == "INTERNAL":
            log.error("Encode failed", exc_info=error)
        self._done(call)
        index, item_id = wire.failing_item(error) or (None, "")
        self._reply({"id": call.id, "ok": False, "code": code, "message": wire.status_message(error),
                     "item_index": index, "item_id": item_id, "missing": wire.missing_items(error)})

    def _done(self, call: _Call) -> None:
        with self._lock:
            self._calls.pop(call.id, None)


def process_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--outputs-fd", type=int, required=True)
    p.add_argument("--outputs-size", type=int, required=True)
    p.add_argument("--cache-fd", type=int, default=None)
    p.add_argument("--cache-size", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s model-process %(message)s")
    in_fd, out_fd = sys.stdin.fileno(), os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt the protocol
    config = json.loads(args.config)
    try:
        from encoder_service.engine import EncoderEngine
        from encoder_service.serving.host.pipeline import EncodePipeline

        if config.get("torch_threads"):
            torch.set_num_threads(config["torch_threads"])
        engine = EncoderEngine(EngineConfig(**config["engine"]))
        outputs = SharedArena(args.outputs_size, fd=args.outputs_fd)
        cache = SharedArena(args.cache_size, fd=args.cache_fd) if args.cache_fd is not None else None
        pipeline = EncodePipeline(engine, PipelineConfig(**config["pipeline"]), outputs=outputs, cache=cache)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it at start-up
        log.exception("could not start the encoder")
        write_frame(out_fd, {"ready": False, "error": f"{type(e).__name__}: {e}"})
        return 1
    write_frame(out_fd, {"ready": True, "info": wire.model_info_to_proto(engine.info()).SerializeToString(),
                         "outputs_pinned": pipeline.outputs_pinned})
    child = _Child(pipeline, out_fd)
    try:
        child.serve(in_fd)
    finally:
        pipeline.close()
    return 0


if __name__ == "__main__":
    code = process_main()
    sys.stdout.flush()
    os._exit(code)  # daemon threads (dispatchers, completion) must not hold the exit up
