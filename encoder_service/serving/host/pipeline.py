"""The serving pipeline: concurrent requests become a continuous stream of ragged batches.

Stages run concurrently, so the device never waits for the CPU:
  1. admission (the caller's thread): header checks, the request's output buffer (pinned on
     CUDA), one preprocessing job per item;
  2. preprocessing (worker processes, `preprocess.py`): decode + tile into the shared arena;
  3. the model thread: packs the ready tiles of any requests into a batch
     (`batching.TileQueue`), launches host-to-device copy + forward + device-to-host copy into
     each request's output rows, and goes straight on to the next batch: up to `depth`
     batches are in flight on the device while new ones form;
  4. the completion thread: waits for each batch's CUDA event (GIL released), frees its arena
     space and resolves the requests whose last tiles it carried.
Serialising for the wire is the transport's job (gRPC server, Ray replica), in another process
(`model_process.py`): with `outputs`, each request's rows are written into that shared arena,
and whoever consumes a finished request gives them back with `release`.

A request that is cancelled or misses its deadline is dropped at every stage boundary: its
queued jobs never start, a worker busy with it is replaced, its queued tiles never reach
the device.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import torch

from encoder_service.batching import Span, TileQueue
from encoder_service.engine import EncodeOutput, EncoderEngine
from encoder_service.errors import BudgetExceeded, DeadlineExceeded, ItemError, Unavailable
from encoder_service.processor import ItemPlan, MediaInput, byte_range
from encoder_service.serving.host.arena import SharedArena
from encoder_service.serving.host.preprocess import PreprocessPool

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    preprocess_workers: int = 0  # worker processes decoding/tiling; 0: half the CPUs, between 1 and 8
    arena_mb: int = 512  # shared memory for preprocessed tiles waiting for the device (backpressure)
    # Shared memory for embeddings until the transport has sent them (model process only): bounds the
    # bytes of responses in flight; a request waits for room (within its deadline), one larger than
    # all of it is refused.
    output_arena_mb: int = 1024
    max_wait_ms: float = 0.0  # an idle device waits this long for more work before running a partial batch
    depth: int = 2  # batches in flight on the device (one running, one queued behind it)
    stale_job_s: float = 0.25  # a worker busy this long with a dead request's item is replaced
    # The model thread takes the GIL back after each of its ~500 kernel launches per batch; with
    # Python's default 5 ms switch interval, any thread running bytecode beside it (the gRPC
    # event loop, serialisers, dispatchers) can make each of those waits last 5 ms and starve
    # the GPU. Serving processes run a short interval (process-wide; 0 leaves Python's default).
    gil_switch_interval_ms: float = 0.5


def default_workers() -> int:
    return min(8, max(1, (os.cpu_count() or 2) // 2))


class _Request:
    def __init__(self, plans: list[ItemPlan], out: torch.Tensor, deadline: float | None, output_offset: int | None):
        self.plans = plans
        self.items: list[_Item] = []
        self.out = out
        self.output_offset = output_offset  # of `out` in the output arena, until it is given back
        self.deadline = deadline
        self.future: Future[EncodeOutput] = Future()
        self.tiles_left = sum(p.num_tiles for p in plans)
        self.submitted = time.perf_counter()
        # preprocess_ms: until its last item was tiled; queue_ms: longest wait of a tiled item for the
        # device; forward_ms: from its first batch's launch to its last batch's completion.
        self.stats = {"preprocess_ms": 0.0, "queue_ms": 0.0, "batches": 0, "batch_requests": 0, "batch_tiles": 0}
        self.first_launch: float | None = None

    def is_live(self) -> bool:
        return not self.future.done() and (self.deadline is None or time.monotonic() < self.deadline)

    def succeeded(self) -> bool:
        return self.future.done() and not self.future.cancelled() and self.future.exception() is None

    def writing_output(self) -> bool:
        """Whether something may still write its rows: tiles in flight on the device, or a video whose
        frames are all in and whose pruning (into `out`) is pending."""
        return any(item.tiles_launched != item.tiles_done
                   or (item.scratch is not None and item.tiles_done == item.plan.num_tiles) for item in self.items)

    def fail(self, error: BaseException) -> None:
        try:
            self.future.set_exception(error)
        except InvalidStateError:  # already cancelled or failed
            pass

    def expire(self) -> None:
        """Called when a stage drops this request's work because it is no longer live."""
        if not self.future.done():
            self.fail(DeadlineExceeded("deadline passed before the request was encoded"))

    def complete(self) -> None:
        now = time.perf_counter()
        stats = dict(self.stats)
        stats["forward_ms"] = 1e3 * (now - (self.first_launch or now))
        stats["total_ms"] = 1e3 * (now - self.submitted)
        output = EncodeOutput(
            embeddings=self.out,
            token_counts=[p.tokens for p in self.plans],
            num_tiles=[p.num_tiles for p in self.plans],
            tokens_per_frame=[item.tokens_per_frame for item in self.items],
            stats=stats,
            frame_timestamps=[item.frame_times for item in self.items],
        )
        try:
            self.future.set_result(output)
        except InvalidStateError:  # cancelled meanwhile
            pass


@dataclass(eq=False)
class _Item:
    request: _Request
    plan: ItemPlan
    first_row: int
    rows: list[int]  # embedding rows of each piece
    tokens_per_frame: list[int]  # of a pruned video: set once EVS ran
    scratch: torch.Tensor | None = None  # a video to prune: all its rows, before EVS picks what it keeps
    frame_times: list[float] = dataclasses.field(default_factory=list)
    offset: int | None = None  # in the arena, while its tiles are there
    ready_at: float = 0.0  # perf_counter() when its tiles were in the arena
    tiles_launched: int = 0
    tiles_done: int = 0
    index: int = 0  # in its request (errors name it)
    item_id: str = ""


@dataclass(eq=False)
class _Batch:
    spans: list[Span[_Item]]
    started: float
    event: torch.cuda.Event | None = None
    error: BaseException | None = None


class EncodePipeline:
    def __init__(self, engine: EncoderEngine, cfg: PipelineConfig | None = None, outputs: SharedArena | None = None):
        """`outputs`: the shared arena that requests' embedding rows are written into (the model process's
        output arena); None: ordinary host memory (pinned on CUDA), owned by the returned tensors."""
        self.engine = engine
        self.cfg = cfg = cfg or PipelineConfig()
        if cfg.gil_switch_interval_ms > 0:
            sys.setswitchinterval(cfg.gil_switch_interval_ms / 1e3)
        self.arena = SharedArena(cfg.arena_mb << 20, "encoder-tiles")
        self._arena_bytes = torch.frombuffer(self.arena.buf, dtype=torch.uint8)
        self.arena_pinned = self._pin(self._arena_bytes)
        self.outputs = outputs
        self._output_bytes = torch.frombuffer(outputs.buf, dtype=torch.uint8) if outputs is not None else None
        self.outputs_pinned = outputs is not None and self._pin(self._output_bytes)
        self.pool = PreprocessPool(
            engine.processor.cfg, self.arena, cfg.preprocess_workers or default_workers(), cfg.stale_job_s
        )
        self._lock = threading.Condition()
        self._queue: TileQueue[_Item] = TileQueue(engine.cfg.max_tokens_per_batch)
        self._inflight = 0
        self._completions: queue.Queue[_Batch | None] = queue.Queue()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._model_loop, name="encoder-model", daemon=True),
            threading.Thread(target=self._completion_loop, name="encoder-completion", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ admission

    def submit(self, items: list[MediaInput], deadline: float | None = None) -> Future[EncodeOutput]:
        """Start encoding one request; `deadline` is a time.monotonic() instant.

        Raises at once for what headers reveal (InvalidInput, BudgetExceeded); everything
        later arrives through the future. Cancelling the future drops the request's work.
        """
        plans = self.engine.plan(items)
        for i, plan in enumerate(plans):
            if not self.arena.fits(plan.nbytes):
                raise BudgetExceeded(f"{plan.nbytes >> 20} MB of pixels exceed the preprocessing arena "
                                     f"({self.cfg.arena_mb} MB)").for_item(i, items[i].item_id)
        if self._closed:
            raise Unavailable("the encoder is shutting down")
        out, output_offset = self._new_output(sum(p.tokens for p in plans), deadline)
        request = _Request(plans, out, deadline, output_offset)
        if output_offset is not None:
            request.future.add_done_callback(lambda _: self._return_output(request))
        row = 0
        for index, (item, plan) in enumerate(zip(items, plans)):
            rows = [self.engine.piece_rows(size) for size in plan.sizes]
            scratch = self.engine.new_output(sum(rows)) if plan.pruned else None
            entry = _Item(request, plan, row, rows, list(plan.tokens_per_frame), scratch, index=index,
                          item_id=item.item_id)
            request.items.append(entry)
            row += plan.tokens
            self.pool.submit(item, plan, request.is_live,
                             lambda offset, error, times, e=entry: self._preprocessed(e, offset, error, times))
        return request.future

    def _new_output(self, rows: int, deadline: float | None) -> tuple[torch.Tensor, int | None]:
        """The request's output rows, from the output arena when there is one (waiting for room until
        the deadline: responses in flight are bounded by the arena, not by how many callers there are)."""
        if self.outputs is None:
            return self.engine.new_output(rows), None
        dtype, hidden = self.engine.dtype, self.engine.hidden_size
        nbytes = rows * hidden * dtype.itemsize
        if not self.outputs.fits(nbytes):
            raise BudgetExceeded(f"the response ({nbytes >> 20} MB) exceeds the output arena "
                                 f"({self.outputs.size >> 20} MB)")
        offset = self.outputs.alloc(nbytes, keep_waiting=lambda: deadline is None or time.monotonic() < deadline)
        if offset is None:
            raise DeadlineExceeded("deadline passed while waiting for room for the response")
        return self._output_bytes[offset : offset + nbytes].view(dtype).view(rows, hidden), offset

    def release(self, out: EncodeOutput) -> None:
        """Give a finished request's rows back to the output arena (with `outputs` only)."""
        if self.outputs is not None:
            self.release_offset(self.output_offset(out))

    def release_offset(self, offset: int) -> None:
        self.outputs.free(offset)

    def output_offset(self, out: EncodeOutput) -> int:
        """Where a finished request's rows start in the output arena."""
        return out.embeddings.data_ptr() - self._output_bytes.data_ptr()

    def _return_output(self, request: _Request) -> None:
        """A failed or cancelled request's rows go back to the arena once nothing writes them any more (the
        device may still be copying into them, EVS may be pruning into them); a successful one's belong to
        the consumer."""
        with self._lock:
            if request.output_offset is None or request.succeeded() or request.writing_output():
                return
            offset, request.output_offset = request.output_offset, None
        self.outputs.free(offset)

    def _preprocessed(self, item: _Item, offset: int | None, error: BaseException | None, times: list[float]) -> None:
        """A worker finished (or dropped) an item: queue its tiles for the device."""
        request = item.request
        item.frame_times = times
        if error is not None:
            request.fail(error.for_item(item.index, item.item_id) if isinstance(error, ItemError) else error)
            return
        if offset is None:
            request.expire()
            return
        item.offset, item.ready_at = offset, time.perf_counter()
        request.stats["preprocess_ms"] = max(request.stats["preprocess_ms"], 1e3 * (item.ready_at - request.submitted))
        with self._lock:
            if self._closed:
                request.fail(Unavailable("the encoder is shutting down"))
            elif request.is_live():
                self._queue.push(item, [self.engine.piece_tokens(size) for size in item.plan.sizes])
                self._lock.notify_all()
                return
        self._free([self._claim(item)])  # never queued: no other thread knows this item
        request.expire()

    # ------------------------------------------------------------------ the model thread

    def _model_loop(self) -> None:
        self._guarded(self._model_steps)

    def _guarded(self, loop) -> None:
        """A stage thread that dies must not leave requests waiting forever: fail them all, refuse new ones."""
        try:
            loop()
        except BaseException as e:
            log.exception("encoder pipeline thread %s died", threading.current_thread().name)
            with self._lock:
                self._closed = True
                stranded = self._queue.drop(lambda it: True)
                self._lock.notify_all()
            error = Unavailable(f"the encoder failed ({type(e).__name__}); retry elsewhere")
            for item in stranded:
                item.request.fail(error)
            while True:  # batches the completion thread will never see
                try:
                    batch = self._completions.get_nowait()
                except queue.Empty:
                    break
                for span in batch.spans if batch else []:
                    span.item.request.fail(error)
            self._completions.put(None)

    def _model_steps(self) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.set_device(self.engine.device)
        while True:
            with self._lock:
                while not self._closed and (not self._queue or self._inflight >= self.cfg.depth):
                    self._lock.wait()
                if self._closed:
                    return
                self._wait_for_company()
                dropped = self._queue.drop(lambda it: not it.request.is_live())
                # Tiles of a dropped item still in flight are freed by the completion thread.
                offsets = [self._claim(it) for it in dropped if it.tiles_done == it.tiles_launched]
                spans = self._queue.take()
                now = time.perf_counter()
                for span in spans:
                    item, stats = span.item, span.item.request.stats
                    if not item.tiles_launched:
                        stats["queue_ms"] = max(stats["queue_ms"], 1e3 * (now - item.ready_at))
                    item.request.first_launch = item.request.first_launch or now
                    item.tiles_launched += span.num_tiles
                if spans:
                    self._inflight += 1
            self._free(offsets)
            for item in dropped:
                item.request.expire()
            if spans:
                try:
                    self._completions.put(self._launch(spans))
                except BaseException:  # taken from the queue, never reaching completion: fail them here
                    for span in spans:
                        span.item.request.fail(Unavailable("the encoder failed; retry elsewhere"))
                    raise

    def _wait_for_company(self) -> None:
        """On an idle device, give concurrent arrivals `max_wait_ms` to join a batch under budget."""
        if self.cfg.max_wait_ms <= 0 or self._inflight:
            return
        until = time.monotonic() + self.cfg.max_wait_ms / 1e3
        while self._queue.queued_tokens < self._queue.max_tokens and not self._closed:
            left = until - time.monotonic()
            if left <= 0:
                return
            self._lock.wait(left)

    def _launch(self, spans: list[Span[_Item]]) -> _Batch:
        batch = _Batch(spans, time.perf_counter())
        try:
            pixels, sizes, outputs = [], [], []
            for span in spans:
                item = span.item
                begin, end = byte_range(item.plan.sizes, span.start, span.stop)
                pixels.append(self._arena_bytes[item.offset + begin : item.offset + end])
                sizes.append(list(item.plan.sizes[span.start : span.stop]))
                first = sum(item.rows[: span.start])
                target = item.scratch if item.scratch is not None else item.request.out[item.first_row :]
                outputs.append(target[first : first + sum(item.rows[span.start : span.stop])])
            batch.event = self.engine.launch(pixels, sizes, outputs)  # None on the CPU: done already
        except Exception as e:  # fails this batch's requests; the pipeline goes on
            log.exception("encoder batch failed")
            batch.error = e
        return batch

    # ------------------------------------------------------------------ the completion thread

    def _completion_loop(self) -> None:
        self._guarded(self._completion_steps)

    def _completion_steps(self) -> None:
        while (batch := self._completions.get()) is not None:
            if batch.error is None and batch.event is not None:
                try:
                    batch.event.synchronize()
                except Exception as e:
                    log.exception("encoder batch failed on the device")
                    batch.error = e
            requests = list({id(s.item.request): s.item.request for s in batch.spans}.values())
            finished, offsets, to_prune = [], [], []
            with self._lock:
                self._inflight -= 1
                for span in batch.spans:
                    item, request = span.item, span.item.request
                    item.tiles_done += span.num_tiles
                    request.tiles_left -= span.num_tiles
                    if item.scratch is not None and item.tiles_done == item.plan.num_tiles:
                        if batch.error is None:
                            to_prune.append(item)
                        else:  # nothing will be pruned into the request's rows
                            item.scratch = None
                    if item.tiles_done == item.tiles_launched and (
                        item.tiles_done == item.plan.num_tiles or not request.is_live() or batch.error
                    ):
                        offsets.append(self._claim(item))
                for request in requests:
                    request.stats["batches"] += 1
                    request.stats["batch_requests"] = max(request.stats["batch_requests"], len(requests))
                    request.stats["batch_tiles"] = max(request.stats["batch_tiles"], sum(s.num_tiles for s in batch.spans))
                    if request.tiles_left == 0 and batch.error is None:
                        finished.append(request)
                self._lock.notify_all()
            self._free(offsets)
            for item in to_prune:  # the video's last frames are in: EVS picks the rows it keeps
                out = item.request.out[item.first_row : item.first_row + item.plan.tokens]
                try:
                    item.tokens_per_frame = self.engine.prune_into(item.scratch, item.plan, out)
                except Exception as e:  # noqa: BLE001 - fails this request only
                    log.exception("video pruning failed")
                    item.request.fail(e)
                item.scratch = None
            for request in requests:
                if batch.error is not None:
                    request.fail(batch.error)
            for request in finished:
                request.complete()
            for request in requests:
                if request.output_offset is not None and request.future.done():
                    self._return_output(request)

    @staticmethod
    def _claim(item: _Item) -> int | None:
        """Take the item's arena offset for freeing (under the lock: exactly one thread frees it)."""
        offset, item.offset = item.offset, None
        return offset

    def _free(self, offsets: list[int | None]) -> None:
        for offset in offsets:
            if offset is not None:
                self.arena.free(offset)

    # ------------------------------------------------------------------ lifecycle

    def _pin(self, region: torch.Tensor) -> bool:
        """Page-lock a shared arena so the device copies straight from/to it (no staging copy)."""
        if self.engine.device.type != "cuda":
            return False
        try:
            err = torch.cuda.cudart().cudaHostRegister(region.data_ptr(), region.numel(), 0)
            ok = int(getattr(err, "value", err)) == 0
        except Exception as e:  # staging through pinned buffers still works
            log.warning("could not page-lock a shared arena (%s); copies are staged", e)
            return False
        return ok and region.is_pinned()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._threads[0].join(timeout=30)
        self._completions.put(None)
        self._threads[1].join(timeout=30)
        self.pool.close()
        with self._lock:
            stranded = self._queue.drop(lambda it: True)
        self._free([self._claim(it) for it in stranded])
        for item in stranded:
            item.request.fail(Unavailable("the encoder shut down before this request was encoded"))
        for region, pinned in ((self._arena_bytes, self.arena_pinned), (self._output_bytes, self.outputs_pinned)):
            if pinned:
                torch.cuda.cudart().cudaHostUnregister(region.data_ptr())
