"""The model in a process of its own; the transports (gRPC server, Ray replica) run in the parent.

Why: sending a large response holds the GIL where nothing can interrupt it (gRPC's Cython layer copies
every message into a slice on the event loop; Ray pickles what a replica returns), and the event loop
runs Python besides. In the model's process each of those holds stalls the kernel launches of a batch
(bench/RESULTS.md: the gRPC server fell well behind the engine while the model shared its process).
Here the model thread shares its process only with the pipeline's light threads.

What crosses the boundary (`messages`):
- requests as serialised `EncodeRequest` bytes (the protobuf is the codec; the child parses and
  validates them, so a malformed request fails there with its gRPC status);
- small typed control messages over a pipe (msgpack, never pickle);
- the embeddings through shared arenas (`arena.py`, `rows.py`: the outputs arena and the cache arena)
  that the device writes each item's rows into (page-locked in the child); an answer names each item's
  segment, the parent reads them in place and gives the answer back with `release` once it is on the
  wire (cached rows stay in the cache).

Every Encode gets exactly one Answer or Failure. If the child dies, every pending call fails with
UNAVAILABLE (retryable) and `alive` turns false; the child exits when the parent does (its pipe closes).
The child's side is `model_child`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import subprocess
import threading
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Callable

import torch

from encoder_service.config import EngineConfig
from encoder_service.contract.errors import EncodeFailed, Unavailable
from encoder_service.contract.wire.model_info import model_info_from_proto
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.serving.host import child, messages
from encoder_service.serving.host.arena import SharedArena
from encoder_service.serving.host.pipeline import PipelineConfig, cache_arena
from encoder_service.serving.host.rows import CACHE, OUTPUTS

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # loading a large checkpoint onto a device
CHILD_MODULE = "encoder_service.serving.host.model_child"


@dataclass
class SharedReply:
    """A finished Encode as the transport sees it: its header, and its rows still in the shared arenas
    (until `ModelProcess.release`)."""

    id: int
    header: bytes  # serialised EncodeResponse without the tensor's bytes (`responses.response_header`)
    segments: list[torch.Tensor]  # each item's rows as flat uint8 views of the arenas, in item order
    items: int
    rows: int

    @property
    def nbytes(self) -> int:
        return sum(s.numel() for s in self.segments)

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
        fds = {name: (arena.fd, arena.size) for name, arena in (("outputs", self.arenas[OUTPUTS]),
                                                                ("cache", self.arenas.get(CACHE))) if arena is not None}
        self.proc = child.spawn(CHILD_MODULE, config, fds)
        self._in, self._out = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        ready = self._wait_ready()
        self.info_bytes: bytes = ready.info
        self.info = model_info_from_proto(pb.ModelInfo.FromString(self.info_bytes))
        self.outputs_pinned: bool = ready.outputs_pinned  # the device copies rows straight into the arenas
        self._on_exit = on_exit
        self._ids = itertools.count()
        self._pending: dict[int, Future] = {}
        self._streams: dict[int, Callable[[StreamEvent], None]] = {}  # streamed calls' event callbacks
        self._lock = threading.Lock()  # guards _pending, _streams and writes to the pipe
        self.alive = True
        self._reader = threading.Thread(target=self._read_replies, name="model-process-reader", daemon=True)
        self._reader.start()

    def shared_memory(self) -> list[torch.Tensor]:
        """The arenas answers' rows live in, as flat uint8 tensors of this process's mapping (what a NIXL
        agent registers to hand rows out by reference)."""
        return list(self._arena_bytes.values())

    def _wait_ready(self) -> messages.Ready:
        msg = messages.receive(self._out) if child.started(self.proc, START_TIMEOUT_S) else None
        if not isinstance(msg, messages.Ready):
            reason = msg.error if msg else f"exited with code {self.proc.poll()} (its log is above)"
            self._kill()
            raise RuntimeError(f"the encoder model process did not start: {reason}")
        return msg

    # ------------------------------------------------------------------ calls

    def submit(self, request: bytes, deadline: float | None = None, extras: dict[str, Any] | None = None,
               namespace: str = "", on_event: Callable[[StreamEvent], None] | None = None) -> Future[SharedReply]:
        """Encode a serialised EncodeRequest; `deadline` is a time.monotonic() instant (the clock is
        shared by the processes of one host); `namespace` keeps cache entries apart (a tenant).
        Cancelling the future drops the request's work. Failures arrive as EncodeFailed carrying the
        gRPC status name. `on_event` (streaming): called on the reader thread with the request's start
        and then each item as its rows are ready, before the future resolves; every item event holds
        the item's rows until `release_items` (call it once the call is over, whatever its outcome)."""
        future, call = self._call(lambda call: messages.Encode(call, request, deadline, extras, namespace,
                                                               on_event is not None), on_event)
        future.add_done_callback(lambda f: f.cancelled() and self._send(messages.Cancel(call)))
        future.call_id = call  # type: ignore[attr-defined]
        return future

    def release(self, reply: SharedReply) -> None:
        """Give a finished request's rows back; `reply.segments` must not be read afterwards."""
        self._send(messages.Release(reply.id))

    async def reply(self, future: Future[SharedReply]) -> SharedReply:
        """Await a `submit`'s answer on the event loop. A caller cancelled just as the answer came (its client
        hung up) has its rows given back here: nobody else will, and they would hold the arena for good."""
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if not future.cancel() and future.exception() is None:  # it had finished: with an answer
                self.release(future.result())
            raise

    def release_items(self, call: int) -> None:
        """Give back the rows every item event of a streamed call held (their segments must not be read
        afterwards), and stop its events."""
        with self._lock:
            self._streams.pop(call, None)
        self._send(messages.ReleaseItems(call))

    def stats(self, timeout: float = 10.0) -> dict[str, int]:
        """Bytes in use in the child's arenas (tests and metrics: nothing may leak), its cache, the ViT
        tokens of its unfinished work (autoscaling) and its GPU memory."""
        return self._call(messages.StatsQuery)[0].result(timeout)

    def _call(self, make: Callable[[int], Any], on_event: Callable[[StreamEvent], None] | None = None
              ) -> tuple[Future, int]:
        """Send `make(call id)`, a message the child answers once; the future resolves with the answer."""
        future: Future = Future()
        with self._lock:
            if not self.alive:
                raise Unavailable("the encoder model process is not running")
            call = next(self._ids)
            self._pending[call] = future
            if on_event is not None:
                self._streams[call] = on_event
            try:
                messages.send(self._in, make(call))
            except OSError:
                del self._pending[call]
                raise Unavailable("the encoder model process is not running") from None
        return future, call

    def _send(self, message) -> None:
        with self._lock:
            if self.alive:
                try:
                    messages.send(self._in, message)
                except OSError:  # the child is gone; the reader fails what is pending
                    pass

    # ------------------------------------------------------------------ replies

    def _read_replies(self) -> None:
        while (msg := messages.receive(self._out)) is not None:
            if isinstance(msg, (messages.StreamStarted, messages.ItemReady)):
                self._stream_event(msg)
                continue
            with self._lock:
                future = self._pending.pop(msg.id, None)
                self._streams.pop(msg.id, None)
            if isinstance(msg, messages.Stats):
                future.set_result(msg.stats)
            elif isinstance(msg, messages.Answer):
                reply = SharedReply(msg.id, msg.header, [self._segment(s) for s in msg.segments], msg.items, msg.rows)
                try:
                    if future is None:
                        raise InvalidStateError("no caller")
                    future.set_result(reply)
                except InvalidStateError:  # cancelled meanwhile: nobody will read the rows
                    self.release(reply)
            elif future is not None:
                try:
                    future.set_exception(msg.error())
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

    def _segment(self, segment: messages.Segment) -> torch.Tensor:
        arena, offset, nbytes = segment
        return self._arena_bytes[arena][offset : offset + nbytes]

    def _stream_event(self, msg: messages.StreamStarted | messages.ItemReady) -> None:
        with self._lock:
            on_event = self._streams.get(msg.id)
        if isinstance(msg, messages.StreamStarted):
            event = StreamEvent(msg.id, token_counts=msg.counts, model=msg.model, request_id=msg.request_id)
        else:
            event = StreamEvent(msg.id, index=msg.index, metadata=msg.meta, rows=self._segment(msg.segment))
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
