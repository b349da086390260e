"""Admission: a request's items become jobs, one per distinct item, and finished jobs' rows reach every
request that waits for them.

An item is a cache hit (its rows are resident in the row store: nothing to do), joins the job of an
identical item being encoded now (single-flight), or starts a job: rows allocated in the row store, one
preprocessing job; its pieces then wait in `ready` (a `TileQueue`) for the device loop. A job lives while
any request waiting for it does: a job whose requests were all cancelled or missed their deadlines is
dropped at every stage boundary. Everything here is guarded by `lock`, a condition the device loop
waits on for ready work.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from encoder_service.batching import TileQueue
from encoder_service.contract.errors import (BudgetExceeded, CacheMiss, DeadlineExceeded, ItemError, PoisonInput,
                                             Unavailable)
from encoder_service.contract.media import MediaDigest, MediaInput, Modality, item_key, media_digest
from encoder_service.contract.plan import ItemPlan
from encoder_service.preprocess import device as device_preprocess
from encoder_service.serving.host.arena import SharedArena
from encoder_service.serving.host.rows import OUTPUTS, Region, RowStore

if TYPE_CHECKING:
    from encoder_service.engine import EncoderEngine
    from encoder_service.serving.host.preprocess_workers import PreprocessPool


class ItemListener(Protocol):
    """Told about a request's items as they become ready (EncodeStream): `started` once, with every
    item's row count, before any `item`; `item` in completion order, with the item's region and one
    reader of it taken for the listener (it gives it back with `RowStore.release`)."""

    def started(self, token_counts: list[int]) -> None: ...

    def item(self, index: int, region: Region, cache_hit: bool) -> None: ...


@dataclass
class HeldRows:
    """A finished request: each item's rows where they live, and what its answer says about them. The
    regions are the holder's until `EncodePipeline.release`."""

    regions: list[Region]
    dtype: torch.dtype
    hidden_size: int
    cache_hits: list[bool]
    stats: dict

    @property
    def token_counts(self) -> list[int]:
        return [r.rows for r in self.regions]

    @property
    def shape(self) -> tuple[int, int]:
        return sum(self.token_counts), self.hidden_size

    def items(self, labels: list[tuple[str, str]] | None = None):
        """Each item's metadata (`labels`: the request's (item_id, content_hash) of each)."""
        labels = labels or [("", "")] * len(self.regions)
        offsets, offset = [], 0
        for region in self.regions:
            offsets.append(offset)
            offset += region.rows
        return [region.describe(at, hit, *label)
                for region, at, hit, label in zip(self.regions, offsets, self.cache_hits, labels)]


class Request:
    """A submitted request, until it completes or fails."""

    def __init__(self, item_ids: list[str], deadline: float | None, listener: ItemListener | None = None):
        count = len(item_ids)
        self.item_ids = item_ids  # errors name the item
        self.listener = listener
        self.regions: list[Region | None] = [None] * count
        self.hits = [False] * count
        self.left = count
        self.deadline = deadline
        self.future: Future[HeldRows] = Future()
        self.submitted = time.perf_counter()
        # preprocess_ms: until its last item was tiled; queue_ms: longest wait of a tiled item for the
        # device; forward_ms: from its first batch's launch to its last batch's completion.
        self.stats = {"preprocess_ms": 0.0, "queue_ms": 0.0, "batches": 0, "batch_requests": 0, "batch_tiles": 0}
        self.first_launch: float | None = None

    def is_live(self) -> bool:
        return not self.future.done() and (self.deadline is None or time.monotonic() < self.deadline)


@dataclass(eq=False)
class Job:
    """One distinct item being encoded, for every request that asked for it meanwhile."""

    key: str
    plan: ItemPlan
    media: MediaInput
    digest: str
    rows: list[int]  # embedding rows of each piece
    vit_tokens: int  # work left for the device (autoscaling's signal)
    subscribers: list[tuple[Request, int]]  # (request, index of the item in it)
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


class Admission:
    """Jobs by key (single-flight), the queue of ready pieces, and requests' completion."""

    def __init__(self, engine: EncoderEngine, store: RowStore, tiles: SharedArena, pool: PreprocessPool,
                 poison_ttl_s: float = 600.0):
        self.engine, self.store, self.tiles, self.pool = engine, store, tiles, pool
        self.poison_ttl_s = poison_ttl_s
        self._poison: dict[str, float] = {}  # media digest -> until when it is refused without a try
        self.model_key = engine.fingerprint.key
        self.lock = threading.Condition()
        self.ready: TileQueue[Job] = TileQueue(engine.cfg.max_tokens_per_batch)  # pieces waiting for the device
        self.closed = False
        self._allocation = threading.Lock()  # one request allocates its rows at a time
        self._jobs: dict[str, Job] = {}  # jobs running, by key
        self.pending_vit_tokens = 0  # ViT tokens of the jobs admitted and not finished
        self.jobs_started = 0  # distinct items sent to preprocessing and the device

    # ------------------------------------------------------------------ requests in

    def submit(self, items: list[MediaInput], deadline: float | None, namespace: str,
               listener: ItemListener | None) -> Future[HeldRows]:
        self.engine.check_item_count(len(items))
        if self.closed:
            raise Unavailable("the encoder is shutting down")
        digests = [media_digest(item.data) for item in items]
        self._refuse_poison(items, digests)
        keys = [self._key(item, digest, namespace) for item, digest in zip(items, digests)]
        plans = {i: self.engine.plan_item(i, item) for i, item in enumerate(items)
                 if not isinstance(item.data, MediaDigest)}
        request = Request([item.item_id for item in items], deadline, listener)
        hits, started, counts = self._admit(request, items, digests, keys, plans)
        if listener is not None:
            listener.started(counts)
        for i, region in hits.items():
            self._deliver(request, i, region)
        with self._allocation:  # all of one request's rows before the next request's: no two wait on each other
            for job in started:
                self._start(job)
        return request.future

    def _admit(self, request: Request, items: list[MediaInput], digests: list[str], keys: list[str],
               plans: dict[int, ItemPlan]) -> tuple[dict[int, Region], list[Job], list[int]]:
        """Each item a hit (its region, read for this request), a join (the job encoding it now) or a new
        job; budgets checked before any job starts (hits found are given back on refusal)."""
        with self.lock:
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
            started: dict[int, Job] = {}
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

    def _refuse_poison(self, items: list[MediaInput], digests: list[str]) -> None:
        """Media that crashed workers recently fail at once: no worker is made to try them again."""
        if not self._poison:
            return
        now = time.monotonic()
        with self.lock:
            self._poison = {d: until for d, until in self._poison.items() if until > now}
            for i, digest in enumerate(digests):
                if digest in self._poison:
                    raise PoisonInput("the item crashed preprocessing workers recently; it will not be tried "
                                      "again").for_item(i, items[i].item_id)

    def _key(self, item: MediaInput, digest: str, namespace: str) -> str:
        q = 0.0
        if item.modality == Modality.VIDEO:
            q = self.engine.planner.rules.video_pruning_rate if item.pruning_rate is None else item.pruning_rate
        sampling = None if item.sampling is None else dataclasses.astuple(item.sampling)
        return item_key(self.model_key, namespace, item.modality.value, digest, sampling, q)

    def _new_job(self, key: str, plan: ItemPlan, item: MediaInput, digest: str) -> Job:
        """A job for a new item (caller holds the lock); `_start` gives it rows and preprocessing."""
        rows = [self.engine.piece_rows(size) for size in plan.sizes]
        job = Job(key, plan, item, digest, rows, sum(self.engine.piece_tokens(size) for size in plan.sizes), [],
                  on_device=self.engine.device_tiler is not None and device_preprocess.on_device(item))
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

    def _start(self, job: Job) -> None:
        """Rows for the job (waiting for room in the outputs arena while it is live), then preprocessing."""
        nbytes = self._row_bytes_of(job.plan)
        # Decoded at full size an image may not fit the arena where its tiles do: the CPU path tiles it.
        job.on_device = job.on_device and self.tiles.fits(job.plan.decoded_nbytes)
        pixel_bytes = job.plan.decoded_nbytes if job.on_device else job.plan.nbytes
        try:
            if not self.tiles.fits(pixel_bytes):
                raise BudgetExceeded(f"{pixel_bytes >> 20} MB of pixels exceed the preprocessing arena "
                                     f"({self.tiles.size >> 20} MB)")
            region = self.store.allocate(nbytes, job.key, keep_waiting=job.is_live)
        except ItemError as e:
            self.end_job(job, e)
            return
        if region is None:
            self.end_job(job, None)
            return
        region.rows, region.num_tiles, region.digest = job.plan.tokens, job.plan.num_tiles, job.digest
        job.region = region
        if job.plan.pruned:
            job.scratch = self.engine.new_output(sum(job.rows))
        self.pool.submit(job.media, job.plan, job.is_live,
                         lambda offset, error, times, j=job: self._preprocessed(j, offset, error, times),
                         decode_only=job.on_device)

    def _preprocessed(self, job: Job, offset: int | None, error: BaseException | None, times: list[float]) -> None:
        """A worker finished (or dropped) a job's item: queue its pieces for the device."""
        job.frame_times = times
        if error is not None or offset is None:
            self.end_job(job, error)
            return
        job.offset, job.ready_at = offset, time.perf_counter()
        with self.lock:
            for request, _ in job.subscribers:
                request.stats["preprocess_ms"] = max(request.stats["preprocess_ms"],
                                                     1e3 * (job.ready_at - request.submitted))
            if self.closed:
                error = Unavailable("the encoder is shutting down")
            elif job.is_live():
                self.ready.push(job, [self.engine.piece_tokens(size) for size in job.plan.sizes])
                self.lock.notify_all()
                return
        self.free_tiles([claim_tiles(job)])  # never queued: no other thread knows this job
        self.end_job(job, error)

    def free_tiles(self, offsets: list[int | None]) -> None:
        for offset in offsets:
            if offset is not None:
                self.tiles.free(offset)

    # ------------------------------------------------------------------ jobs out

    def end_job(self, job: Job, error: BaseException | None) -> None:
        """A job that will not finish: its requests fail (`error`, or expire when None), its rows go back
        once nothing writes them (else the completion thread calls this again when the last tiles land)."""
        with self.lock:
            if isinstance(error, PoisonInput):
                self._poison[job.digest] = time.monotonic() + self.poison_ttl_s
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

    def finish_job(self, job: Job) -> None:
        """A job's rows are complete: published to the cache, handed to every request still waiting."""
        region = job.region
        if job.plan.frames:
            region.frames = dataclasses.replace(job.plan.frames, times=tuple(job.frame_times))
        with self.lock:
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

    def _deliver(self, request: Request, index: int, region: Region) -> None:
        """An item's rows are ready (`region` with a reader taken for this request)."""
        with self.lock:
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

    def _complete(self, request: Request) -> None:
        now = time.perf_counter()
        stats = dict(request.stats)
        stats["forward_ms"] = 1e3 * (now - (request.first_launch or now))
        stats["total_ms"] = 1e3 * (now - request.submitted)
        stats["cache_hits"] = sum(request.hits)
        with self.lock:  # the rows pass to the result, or back if the request failed meanwhile
            regions, request.regions = request.regions, [None] * len(request.regions)
        held = HeldRows(regions, self.engine.dtype, self.engine.hidden_size, list(request.hits), stats)
        try:
            request.future.set_result(held)
        except InvalidStateError:  # cancelled or failed meanwhile: nobody will read the rows
            self.release(held)

    def _fail(self, request: Request, error: BaseException | None) -> None:
        """Fail a request (`error` None: it is no longer live); rows it already holds go back."""
        try:
            request.future.set_exception(error or DeadlineExceeded("deadline passed before the request was encoded"))
        except InvalidStateError:  # already cancelled, failed or complete
            pass
        with self.lock:
            held, request.regions = [r for r in request.regions if r is not None], [None] * len(request.regions)
        for region in held:
            self.store.release(region)

    def release(self, held: HeldRows) -> None:
        """Give a finished request's rows back (cached rows stay in the cache, now unread)."""
        for region in held.regions:
            self.store.release(region)


def claim_tiles(job: Job) -> int | None:
    """Take the job's tile arena offset for freeing (under the lock: exactly one thread frees it)."""
    offset, job.offset, job.device_pixels = job.offset, None, None
    return offset
