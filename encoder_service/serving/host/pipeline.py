"""The serving pipeline: concurrent requests become a continuous stream of ragged batches.

Requests are made of items; the pipeline encodes *jobs*, one per distinct item (its key:
`digest.item_key`, computed from the bytes by the server itself). Stages run concurrently, so
the device never waits for the CPU:
  1. admission (the caller's thread): header checks; each item is a cache hit (its rows are
     already in the row store: nothing to do), joins the job of an identical item being encoded
     now (single-flight), or starts a job: rows allocated in the row store, one preprocessing job;
  2. preprocessing (worker processes, `preprocess.py`): decode + tile into the shared tile arena
     (with the engine's `device_tiler`, images are only decoded there);
  3. the model thread: packs the ready tiles of any jobs into a batch (`batching.TileQueue`),
     launches host-to-device copy (of a decoded image: then its resize and tiling on the device,
     `preprocess_device`) + forward + device-to-host copy into each job's rows, and goes
     straight on to the next batch: up to `depth` batches are in flight on the device;
  4. the completion thread: waits for each batch's CUDA event (GIL released), frees tile arena
     space, prunes finished videos (EVS), publishes finished jobs' rows to the cache and hands
     them to every request waiting for them.
A finished request (`Encoding`) holds its items' rows where they live (`rows.Region`s of shared
memory, read in place by the transport in another process, `model_process.py`) until its
consumer gives them back with `release`; `encode` gathers them into one tensor instead.

A job lives while any request waiting for it does: a job whose requests were all cancelled or
missed their deadlines is dropped at every stage boundary (its queued work never starts, a worker
busy with it is replaced, its queued tiles never reach the device).
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
from dataclasses import dataclass, field
from typing import Protocol

import torch

from encoder_service import preprocess_device
from encoder_service.batching import Span, TileQueue
from encoder_service.digest import MediaDigest, item_key, media_digest
from encoder_service.engine import EncodeOutput, EncoderEngine, running_offsets
from encoder_service.errors import BudgetExceeded, CacheMiss, DeadlineExceeded, ItemError, Unavailable
from encoder_service.processor import ItemPlan, MediaInput, Modality, byte_range
from encoder_service.serving.heap import keep_large_buffers_in_heap
from encoder_service.serving.host.arena import SharedArena
from encoder_service.serving.host.preprocess import PreprocessPool
from encoder_service.serving.host.rows import OUTPUTS, Region, RowStore
from encoder_service.video.decode import SampledFrames

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    preprocess_workers: int = 0  # worker processes decoding/tiling; 0: half the CPUs, between 1 and 8
    arena_mb: int = 512  # shared memory for preprocessed tiles waiting for the device (backpressure)
    # Shared memory for the rows of uncached items until the transport has sent them: bounds the bytes of
    # responses in flight; a request waits for room (within its deadline), one larger than all of it is refused.
    output_arena_mb: int = 1024
    # The embedding cache: shared memory holding encoded items' rows by content (LRU, this many MB);
    # 0 turns it off, None sizes it for the node (`default_cache_mb`). Identical items in flight are
    # encoded once either way.
    cache_mb: int | None = None
    max_wait_ms: float = 0.0  # an idle device waits this long for more work before running a partial batch
    depth: int = 2  # batches in flight on the device (one running, one queued behind it)
    stale_job_s: float = 0.25  # a worker busy this long with a dead request's item is replaced
    # The model thread takes the GIL back after each of its ~500 kernel launches per batch; with
    # Python's default 5 ms switch interval, any thread running bytecode beside it (the gRPC
    # event loop, serialisers, dispatchers) can make each of those waits last 5 ms and starve
    # the GPU. Serving processes run a short interval (process-wide; 0 leaves Python's default).
    gil_switch_interval_ms: float = 0.5
    # Large buffers (rows, messages, activations) from glibc's reused heap rather than fresh page-faulted
    # mappings, in every process that serves (`heap.keep_large_buffers_in_heap`: a 34 MB message took
    # 27 ms instead of 88 on the CPU machine; freed memory stays with the process).
    heap_large_buffers: bool = True


def default_workers() -> int:
    return min(8, max(1, (os.cpu_count() or 2) // 2))


def default_cache_mb() -> int:
    """A sixteenth of the node's memory, at most 4 GiB: room for ~100 12-tile images at LLM width 5120 in
    bf16 per GiB, without crowding what the node's other processes need."""
    try:
        total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    except (ValueError, OSError, AttributeError):
        total_mb = 16384
    return min(4096, total_mb // 16)


def cache_arena(cfg: PipelineConfig) -> SharedArena | None:
    """The cache's shared memory as `cfg` sizes it (None: the cache is off)."""
    mb = default_cache_mb() if cfg.cache_mb is None else cfg.cache_mb
    return SharedArena(mb << 20, "encoder-cache") if mb > 0 else None


class ItemListener(Protocol):
    """Told about a request's items as they become ready (EncodeStream): `started` once, with every
    item's row count, before any `item`; `item` in completion order, with the item's region and one
    reader of it taken for the listener (it gives it back with `EncodePipeline.store.release`)."""

    def started(self, token_counts: list[int]) -> None: ...

    def item(self, index: int, region: Region, cache_hit: bool) -> None: ...


@dataclass
class Encoding:
    """A finished request: each item's rows where they live, and what its response says about them.
    The regions are the holder's until `EncodePipeline.release`."""

    regions: list[Region]
    dtype: torch.dtype
    hidden_size: int
    cache_hits: list[bool]
    stats: dict

    @property
    def token_counts(self) -> list[int]:
        return [r.rows for r in self.regions]

    @property
    def offsets(self) -> list[int]:
        return running_offsets(self.token_counts)

    @property
    def num_tiles(self) -> list[int]:
        return [r.num_tiles for r in self.regions]

    @property
    def tokens_per_frame(self) -> list[list[int]]:
        return [r.tokens_per_frame for r in self.regions]

    @property
    def video_frames(self) -> list[SampledFrames | None]:
        return [r.frames for r in self.regions]

    @property
    def digests(self) -> list[str]:
        return [r.digest for r in self.regions]

    @property
    def shape(self) -> tuple[int, int]:
        return sum(self.token_counts), self.hidden_size

    def segments(self) -> list[tuple[int, int, int]]:
        """(arena, offset, bytes) of each item's rows, in item order: what the transport frames."""
        return [(r.arena, r.offset, r.rows * self.hidden_size * self.dtype.itemsize) for r in self.regions]


class _Request:
    def __init__(self, item_ids: list[str], deadline: float | None, listener: ItemListener | None = None):
        count = len(item_ids)
        self.item_ids = item_ids  # errors name the item
        self.listener = listener
        self.regions: list[Region | None] = [None] * count
        self.hits = [False] * count
        self.left = count
        self.deadline = deadline
        self.future: Future[Encoding] = Future()
        self.submitted = time.perf_counter()
        # preprocess_ms: until its last item was tiled; queue_ms: longest wait of a tiled item for the
        # device; forward_ms: from its first batch's launch to its last batch's completion.
        self.stats = {"preprocess_ms": 0.0, "queue_ms": 0.0, "batches": 0, "batch_requests": 0, "batch_tiles": 0}
        self.first_launch: float | None = None

    def is_live(self) -> bool:
        return not self.future.done() and (self.deadline is None or time.monotonic() < self.deadline)


@dataclass(eq=False)
class _Job:
    """One distinct item being encoded, for every request that asked for it meanwhile."""

    key: str
    plan: ItemPlan
    media: MediaInput
    digest: str
    rows: list[int]  # embedding rows of each piece
    vit_tokens: int  # work left for the device (autoscaling's signal)
    subscribers: list[tuple[_Request, int]]  # (request, index of the item in it)
    region: Region | None = None
    scratch: torch.Tensor | None = None  # a video to prune: all its rows, before EVS picks what it keeps
    frame_times: list[float] = field(default_factory=list)
    on_device: bool = False  # an image the device resizes and tiles (the arena holds it decoded)
    offset: int | None = None  # in the tile arena, while its tiles (or decoded image) are there
    device_pixels: torch.Tensor | None = None  # its tiles made on the device, from its first batch to its last
    ready_at: float = 0.0  # perf_counter() when its tiles were in the arena
    tiles_launched: int = 0
    tiles_done: int = 0
    ended: bool = False

    def is_live(self) -> bool:
        return any(request.is_live() for request, _ in self.subscribers)

    def writing(self) -> bool:
        """Whether something may still write its rows: tiles on the device, or EVS pending."""
        return self.tiles_launched != self.tiles_done or (
            self.scratch is not None and self.tiles_done == self.plan.num_tiles)


@dataclass(eq=False)
class _Batch:
    spans: list[Span[_Job]]
    started: float
    event: torch.cuda.Event | None = None
    error: BaseException | None = None


class EncodePipeline:
    def __init__(self, engine: EncoderEngine, cfg: PipelineConfig | None = None, outputs: SharedArena | None = None,
                 cache: SharedArena | None = None):
        """`outputs` / `cache`: the shared arenas rows are written into (the model process passes the ones
        it shares with the transport); None: arenas of this process (`output_arena_mb`, `cache_mb`)."""
        self.engine = engine
        self.cfg = cfg = cfg or PipelineConfig()
        if cfg.gil_switch_interval_ms > 0:
            sys.setswitchinterval(cfg.gil_switch_interval_ms / 1e3)
        if cfg.heap_large_buffers:
            keep_large_buffers_in_heap()
        self.arena = SharedArena(cfg.arena_mb << 20, "encoder-tiles")
        self._arena_bytes = torch.frombuffer(self.arena.buf, dtype=torch.uint8)
        self.arena_pinned = self._pin(self._arena_bytes)
        outputs_given = outputs is not None  # the model process shares its own arenas (cache or none)
        outputs = outputs or SharedArena(cfg.output_arena_mb << 20, "encoder-outputs")
        cache = cache if cache is not None or outputs_given else cache_arena(cfg)
        self.store = RowStore(outputs, cache)
        self._row_bytes = {arena: torch.frombuffer(a.buf, dtype=torch.uint8)
                           for arena, a in self.store.arenas.items() if a is not None}
        self.outputs_pinned = all(self._pin(view) for view in self._row_bytes.values())
        self.pool = PreprocessPool(
            engine.processor.cfg, self.arena, cfg.preprocess_workers or default_workers(), cfg.stale_job_s
        )
        self.model_key = engine.fingerprint.key
        self._lock = threading.Condition()
        self._admission = threading.Lock()  # one request allocates its rows at a time
        self._queue: TileQueue[_Job] = TileQueue(engine.cfg.max_tokens_per_batch)
        self._jobs: dict[str, _Job] = {}  # jobs running, by key (single-flight)
        self.pending_vit_tokens = 0  # ViT tokens of the jobs admitted and not finished
        self.jobs_started = 0  # distinct items sent to preprocessing and the device
        self.jobs_device_tiled = 0  # of them, images resized and tiled on the device (preprocess_device)
        self.device_busy_s = 0.0  # time the device had a batch in flight (as the host sees it)
        self._last_completion = 0.0
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

    def submit(self, items: list[MediaInput], deadline: float | None = None, namespace: str = "",
               listener: ItemListener | None = None) -> Future[Encoding]:
        """Start encoding one request; `deadline` is a time.monotonic() instant; `namespace` keeps cache
        entries apart (a tenant). Raises at once for what headers and the cache reveal (InvalidInput,
        BudgetExceeded, CacheMiss); everything later arrives through the future. Cancelling the future
        drops the request's work (and any job nobody else waits for). `listener` hears of each item as
        its rows are ready (streaming)."""
        self.engine.check_item_count(len(items))
        if self._closed:
            raise Unavailable("the encoder is shutting down")
        digests = [media_digest(item.data) for item in items]
        keys = [self._key(item, digest, namespace) for item, digest in zip(items, digests)]
        plans = {i: self.engine.plan_item(i, item) for i, item in enumerate(items)
                 if not isinstance(item.data, MediaDigest)}
        request = _Request([item.item_id for item in items], deadline, listener)
        hits, started, counts = self._admit(request, items, digests, keys, plans)
        if listener is not None:
            listener.started(counts)
        for i, region in hits.items():
            self._deliver(request, i, region)
        with self._admission:  # all of one request's rows before the next request's: no two wait on each other
            for job in started:
                self._start(job)
        return request.future

    def _admit(self, request: _Request, items: list[MediaInput], digests: list[str], keys: list[str],
               plans: dict[int, ItemPlan]) -> tuple[dict[int, Region], list[_Job], list[int]]:
        """Each item a hit (its region, read for this request), a join (the job encoding it now) or a new
        job; budgets checked before any job starts (hits found are given back on refusal)."""
        with self._lock:
            hits, joins, new, missing = {}, {}, {}, []
            first_with_media = {}  # key -> index of an item of this request that carries its media
            for i in plans:
                first_with_media.setdefault(keys[i], i)
            for i, key in enumerate(keys):
                if key in self._jobs:
                    joins[i] = self._jobs[key]
                elif (region := self.store.find(key)) is not None:
                    hits[i] = region
                elif key in first_with_media:
                    new[i] = first_with_media[key]
                else:
                    missing.append((i, items[i].item_id))
            distinct = [plans[j] for j in set(new.values())]  # what this request makes the server encode
            try:
                if missing:
                    raise CacheMiss(missing)
                self.engine.check_budgets(
                    sum(plan.decode_pixels for plan in distinct),
                    sum(r.rows for r in hits.values()) + sum(j.plan.tokens for j in joins.values())
                    + sum(plans[j].tokens for j in new.values()))
                self._check_fits_outputs(sum(SharedArena.footprint(self._row_bytes_of(plan)) for plan in distinct))
            except BaseException:
                for region in hits.values():
                    self.store.release(region)
                raise
            started: dict[int, _Job] = {}
            for i, j in new.items():  # an item twice in one request is one job
                if j not in started:
                    started[j] = self._new_job(keys[j], plans[j], items[j], digests[j])
                started[j].subscribers.append((request, i))
            for i, job in joins.items():
                job.subscribers.append((request, i))
                self.store.stats.joins += 1
            for i in [*hits, *joins]:
                request.hits[i] = True
        counts = [hits[i].rows if i in hits else joins[i].plan.tokens if i in joins else plans[new[i]].tokens
                  for i in range(len(items))]
        return hits, list(started.values()), counts

    def encode(self, items: list[MediaInput], deadline: float | None = None, namespace: str = "") -> Future[EncodeOutput]:
        """`submit`, with the rows gathered into one tensor of the caller's own (the in-process path)."""
        encoding = self.submit(items, deadline, namespace)
        out: Future[EncodeOutput] = Future()

        def finished(f: Future[Encoding]) -> None:
            if f.cancelled():
                out.cancel()
            elif f.exception() is not None:
                out.set_exception(f.exception())
            else:
                result = f.result()
                try:
                    out.set_result(self.gather(result))
                finally:
                    self.release(result)

        out.add_done_callback(lambda f: f.cancelled() and encoding.cancel())
        encoding.add_done_callback(finished)
        return out

    def _key(self, item: MediaInput, digest: str, namespace: str) -> str:
        q = 0.0
        if item.modality == Modality.VIDEO:
            q = self.engine.processor.cfg.video_pruning_rate if item.pruning_rate is None else item.pruning_rate
        sampling = None if item.sampling is None else dataclasses.astuple(item.sampling)
        return item_key(self.model_key, namespace, item.modality.value, digest, sampling, q)

    def _new_job(self, key: str, plan: ItemPlan, item: MediaInput, digest: str) -> _Job:
        """A job for a new item (caller holds the lock); `_start` gives it rows and preprocessing."""
        rows = [self.engine.piece_rows(size) for size in plan.sizes]
        job = _Job(key, plan, item, digest, rows, sum(self.engine.piece_tokens(size) for size in plan.sizes), [],
                   on_device=self.engine.device_tiler is not None and preprocess_device.on_device(item))
        self._jobs[key] = job
        self.jobs_started += 1
        self.pending_vit_tokens += job.vit_tokens
        return job

    def _row_bytes_of(self, plan: ItemPlan) -> int:
        return plan.tokens * self.engine.hidden_size * self.engine.dtype.itemsize

    def _check_fits_outputs(self, nbytes: int) -> None:
        """A request's new rows may all have to wait in the outputs arena (the cache may be full of rows
        being read): more than it holds could never be answered."""
        outputs = self.store.arenas[OUTPUTS]
        if not outputs.fits(nbytes):
            raise BudgetExceeded(f"the response ({nbytes >> 20} MB) exceeds the output arena ({outputs.size >> 20} MB)")

    def _start(self, job: _Job) -> None:
        """Rows for the job (waiting for room in the outputs arena while it is live), then preprocessing."""
        nbytes = self._row_bytes_of(job.plan)
        # Decoded at full size an image may not fit the arena where its tiles do: the CPU path tiles it.
        job.on_device = job.on_device and self.arena.fits(job.plan.decoded_nbytes)
        pixel_bytes = job.plan.decoded_nbytes if job.on_device else job.plan.nbytes
        try:
            if not self.arena.fits(pixel_bytes):
                raise BudgetExceeded(f"{pixel_bytes >> 20} MB of pixels exceed the preprocessing arena "
                                     f"({self.cfg.arena_mb} MB)")
            region = self.store.allocate(nbytes, job.key, keep_waiting=job.is_live)
        except ItemError as e:
            self._end_job(job, e)
            return
        if region is None:
            self._end_job(job, None)
            return
        region.rows, region.num_tiles, region.digest = job.plan.tokens, job.plan.num_tiles, job.digest
        job.region = region
        if job.plan.pruned:
            job.scratch = self.engine.new_output(sum(job.rows))
        self.pool.submit(job.media, job.plan, job.is_live,
                         lambda offset, error, times, j=job: self._preprocessed(j, offset, error, times),
                         decode_only=job.on_device)

    def _deliver(self, request: _Request, index: int, region: Region) -> None:
        """An item's rows are ready (`region` with a reader taken for this request)."""
        with self._lock:
            live = request.is_live()
            if live:
                request.regions[index] = region
                request.left -= 1
                complete = request.left == 0
                if request.listener is not None:  # its own reader: a failure meanwhile cannot free the rows
                    self.store.acquire(region)
        if not live:
            self.store.release(region)
            self._fail(request, None)
            return
        if request.listener is not None:
            request.listener.item(index, region, request.hits[index])
        if complete:
            self._complete(request)

    def _complete(self, request: _Request) -> None:
        now = time.perf_counter()
        stats = dict(request.stats)
        stats["forward_ms"] = 1e3 * (now - (request.first_launch or now))
        stats["total_ms"] = 1e3 * (now - request.submitted)
        stats["cache_hits"] = sum(request.hits)
        with self._lock:  # the rows pass to the result, or back if the request failed meanwhile
            regions, request.regions = request.regions, [None] * len(request.regions)
        encoding = Encoding(regions, self.engine.dtype, self.engine.hidden_size, list(request.hits), stats)
        try:
            request.future.set_result(encoding)
        except InvalidStateError:  # cancelled or failed meanwhile: nobody will read the rows
            self.release(encoding)

    def _fail(self, request: _Request, error: BaseException | None) -> None:
        """Fail a request (`error` None: it is no longer live); rows it already holds go back."""
        try:
            request.future.set_exception(error or DeadlineExceeded("deadline passed before the request was encoded"))
        except InvalidStateError:  # already cancelled, failed or complete
            pass
        with self._lock:
            held, request.regions = [r for r in request.regions if r is not None], [None] * len(request.regions)
        for region in held:
            self.store.release(region)

    def release(self, encoding: Encoding) -> None:
        """Give a finished request's rows back (cached rows stay in the cache, now unread)."""
        for region in encoding.regions:
            self.store.release(region)

    def rows(self, region: Region) -> torch.Tensor:
        """A region's rows as a [rows, hidden] view of the arena."""
        nbytes = region.rows * self.engine.hidden_size * self.engine.dtype.itemsize
        raw = self._row_bytes[region.arena][region.offset : region.offset + nbytes]
        return raw.view(self.engine.dtype).view(region.rows, self.engine.hidden_size)

    def gather(self, encoding: Encoding) -> EncodeOutput:
        """One tensor of the caller's own (pinned on CUDA) holding every item's rows, in order."""
        out = self.engine.new_output(sum(encoding.token_counts))
        for region, offset in zip(encoding.regions, encoding.offsets):
            out[offset : offset + region.rows].copy_(self.rows(region))
        return EncodeOutput(out, encoding.token_counts, encoding.num_tiles, encoding.tokens_per_frame,
                            encoding.stats, encoding.video_frames, encoding.digests, encoding.cache_hits)

    def _preprocessed(self, job: _Job, offset: int | None, error: BaseException | None, times: list[float]) -> None:
        """A worker finished (or dropped) a job's item: queue its tiles for the device."""
        job.frame_times = times
        if error is not None or offset is None:
            self._end_job(job, error)
            return
        job.offset, job.ready_at = offset, time.perf_counter()
        with self._lock:
            for request, _ in job.subscribers:
                request.stats["preprocess_ms"] = max(request.stats["preprocess_ms"],
                                                     1e3 * (job.ready_at - request.submitted))
            if self._closed:
                error = Unavailable("the encoder is shutting down")
            elif job.is_live():
                self._queue.push(job, [self.engine.piece_tokens(size) for size in job.plan.sizes])
                self._lock.notify_all()
                return
        self._free([self._claim(job)])  # never queued: no other thread knows this job
        self._end_job(job, error)

    def _end_job(self, job: _Job, error: BaseException | None) -> None:
        """A job that will not finish: its requests fail (`error`, or expire when None), its rows go back
        once nothing writes them (else the completion thread calls this again when the last tiles land)."""
        with self._lock:
            if self._jobs.get(job.key) is job:
                del self._jobs[job.key]
            if not job.ended:
                job.ended = True
                self.pending_vit_tokens -= job.vit_tokens
            subscribers, job.subscribers = job.subscribers, []
            region = None
            if job.region is not None and not job.writing():
                region, job.region = job.region, None
        for request, index in subscribers:
            named = error.for_item(index, request.item_ids[index]) if isinstance(error, ItemError) else error
            self._fail(request, named)
        if region is not None:
            self.store.release(region)

    def _finish_job(self, job: _Job) -> None:
        """A job's rows are complete: published to the cache, handed to every request still waiting."""
        region = job.region
        if job.plan.frames:
            region.frames = dataclasses.replace(job.plan.frames, times=tuple(job.frame_times))
        with self._lock:
            self.store.publish(region)
            if self._jobs.get(job.key) is job:
                del self._jobs[job.key]
            job.ended = True
            self.pending_vit_tokens -= job.vit_tokens
            subscribers, job.subscribers, job.region = job.subscribers, [], None
        for request, index in subscribers:
            self.store.acquire(region)  # the request's reader, taken before the writer's own goes
            self._deliver(request, index, region)
        self.store.release(region)

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
                stranded = self._queue.drop(lambda job: True)
                self._lock.notify_all()
            error = Unavailable(f"the encoder failed ({type(e).__name__}); retry elsewhere")
            for job in stranded:
                self._end_job(job, error)
            while True:  # batches the completion thread will never see
                try:
                    batch = self._completions.get_nowait()
                except queue.Empty:
                    break
                for span in batch.spans if batch else []:
                    self._end_job(span.item, error)
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
                dropped = self._queue.drop(lambda job: not job.is_live())
                # Tiles of a dropped job still in flight are freed by the completion thread.
                offsets = [self._claim(job) for job in dropped if job.tiles_done == job.tiles_launched]
                spans = self._queue.take()
                now = time.perf_counter()
                for span in spans:
                    job = span.item
                    for request, _ in job.subscribers:
                        if not job.tiles_launched:
                            request.stats["queue_ms"] = max(request.stats["queue_ms"], 1e3 * (now - job.ready_at))
                        request.first_launch = request.first_launch or now
                    job.tiles_launched += span.num_tiles
                if spans:
                    self._inflight += 1
            self._free(offsets)
            for job in dropped:
                self._end_job(job, None)
            if spans:
                try:
                    self._completions.put(self._launch(spans))
                except BaseException:  # taken from the queue, never reaching completion: fail them here
                    for span in spans:
                        self._end_job(span.item, Unavailable("the encoder failed; retry elsewhere"))
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

    def _launch(self, spans: list[Span[_Job]]) -> _Batch:
        batch = _Batch(spans, time.perf_counter())
        try:
            pixels, sizes, outputs = [], [], []
            for span in spans:
                job = span.item
                if job.ended:  # its device tiling failed (in this batch): its spans are skipped
                    continue
                begin, end = byte_range(job.plan.sizes, span.start, span.stop)
                if job.on_device:
                    if (source := self._device_pixels(job)) is None:
                        continue
                    pixels.append(source[begin:end])
                else:
                    pixels.append(self._arena_bytes[job.offset + begin : job.offset + end])
                sizes.append(list(job.plan.sizes[span.start : span.stop]))
                first = sum(job.rows[: span.start])
                target = job.scratch if job.scratch is not None else self.rows(job.region)
                outputs.append(target[first : first + sum(job.rows[span.start : span.stop])])
            if pixels:
                batch.event = self.engine.launch(pixels, sizes, outputs)  # None on the CPU: done already
        except Exception as e:  # fails this batch's jobs; the pipeline goes on
            log.exception("encoder batch failed")
            batch.error = e
        return batch

    def _device_pixels(self, job: _Job) -> torch.Tensor | None:
        """A device-tiled job's pieces, made at its first batch from the decoded image in the (page-locked)
        arena, on the model's stream. A failure (the decoded size, device memory) fails this job only."""
        if job.device_pixels is None:
            try:
                decoded = self._arena_bytes[job.offset : job.offset + job.plan.decoded_nbytes]
                image = decoded.to(self.engine.device, non_blocking=True).view(*job.plan.image_size, 3)
                job.device_pixels = self.engine.device_tiler.pieces(image, job.plan)
                self.jobs_device_tiled += 1
            except Exception as e:  # noqa: BLE001
                log.warning("device tiling failed for one item: %s", e)
                self._end_job(job, e if isinstance(e, ItemError) else Unavailable(f"device tiling failed: {e}"))
                return None
        return job.device_pixels

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
            now = time.perf_counter()
            self.device_busy_s += now - max(batch.started, self._last_completion)
            self._last_completion = now
            jobs = list(dict.fromkeys(span.item for span in batch.spans))
            offsets, finished, to_prune, ended = [], [], [], []
            with self._lock:
                self._inflight -= 1
                requests = {id(r): r for job in jobs for r, _ in job.subscribers}.values()
                for request in requests:
                    request.stats["batches"] += 1
                    request.stats["batch_requests"] = max(request.stats["batch_requests"], len(requests))
                    request.stats["batch_tiles"] = max(request.stats["batch_tiles"],
                                                       sum(s.num_tiles for s in batch.spans))
                for span in batch.spans:
                    job = span.item
                    job.tiles_done += span.num_tiles
                    if job.tiles_done == job.tiles_launched and (
                        job.tiles_done == job.plan.num_tiles or job.ended or batch.error or not job.is_live()
                    ):
                        offsets.append(self._claim(job))
                for job in jobs:
                    if job.tiles_done != job.plan.num_tiles or batch.error or job.ended:
                        if (batch.error or job.ended) and job.tiles_done == job.tiles_launched:
                            ended.append(job)
                    elif job.scratch is not None:
                        to_prune.append(job)
                    else:
                        finished.append(job)
                self._lock.notify_all()
            self._free(offsets)
            for job in to_prune:  # the video's last frames are in: EVS picks the rows it keeps
                try:
                    job.region.tokens_per_frame = self.engine.prune_into(job.scratch, job.plan, self.rows(job.region))
                    job.scratch = None
                    finished.append(job)
                except Exception as e:  # noqa: BLE001 - fails this job only
                    log.exception("video pruning failed")
                    job.scratch = None
                    self._end_job(job, e)
            for job in finished:
                if not job.region.tokens_per_frame:
                    job.region.tokens_per_frame = list(job.plan.tokens_per_frame)
                self._finish_job(job)
            for job in ended:
                self._end_job(job, batch.error)

    @staticmethod
    def _claim(job: _Job) -> int | None:
        """Take the job's tile arena offset for freeing (under the lock: exactly one thread frees it)."""
        offset, job.offset, job.device_pixels = job.offset, None, None
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
            stranded = self._queue.drop(lambda job: True)
        self._free([self._claim(job) for job in stranded])
        for job in stranded:
            self._end_job(job, Unavailable("the encoder shut down before this request was encoded"))
        for region in [self._arena_bytes, *self._row_bytes.values()]:
            if region.is_pinned():
                torch.cuda.cudart().cudaHostUnregister(region.data_ptr())
