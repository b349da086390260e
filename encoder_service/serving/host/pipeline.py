"""The serving pipeline: concurrent requests become a continuous stream of ragged batches.

Requests are made of items; the pipeline encodes *jobs*, one per distinct item (its key:
`contract.media.item_key`, computed from the bytes by the server itself). Stages run concurrently, so
the device never waits for the CPU:
  1. admission (`admission.Admission`, the caller's thread): header checks; each item a cache hit,
     a join of the identical item being encoded now (single-flight), or a new job with its rows
     allocated in the row store (`rows.RowStore`);
  2. preprocessing (worker processes, `preprocess_workers`): decode + tile into the shared tile arena
     (with the engine's device tiler, images are only decoded there);
  3. the device loop (`device_loop.DeviceLoop`): a model thread packing ready pieces into batches and
     keeping up to `depth` of them in flight on the device, a completion thread finishing them.
A finished request (`HeldRows`) holds its items' rows where they live (shared memory, read in place by
the transport in another process, `model_process`) until its consumer gives them back with `release`;
`encode` gathers them into one tensor instead (the in-process path).
"""

from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from encoder_service.contract.errors import Unavailable
from encoder_service.contract.media import MediaInput
from encoder_service.contract.result import EncodeResult
from encoder_service.engine import EncoderEngine
from encoder_service.serving.heap import keep_large_buffers_in_heap
from encoder_service.serving.host.admission import Admission, HeldRows, ItemListener, claim_tiles
from encoder_service.serving.host.arena import SharedArena
from encoder_service.serving.host.device_loop import DeviceLoop
from encoder_service.serving.host.preprocess_workers import PreprocessPool
from encoder_service.serving.host.rows import Region, RowStore

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
    poison_ttl_s: float = 600.0  # media that crashed two workers are refused (INVALID_ARGUMENT, POISON) this long
    # The model thread takes the GIL back after each of its kernel launches; with Python's default 5 ms
    # switch interval, any thread running bytecode beside it (the gRPC event loop, serialisers,
    # dispatchers) can make each of those waits last 5 ms and starve the GPU. Serving processes run a
    # short interval (process-wide; 0 leaves Python's default).
    gil_switch_interval_ms: float = 0.5
    # Large buffers (rows, messages, activations) from glibc's reused heap rather than fresh page-faulted
    # mappings, in every process that serves (`heap.keep_large_buffers_in_heap`; bench/RESULTS.md heap_buffers).
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
        self.pool = PreprocessPool(engine.preprocessor.cfg, self.arena, cfg.preprocess_workers or default_workers(),
                                   cfg.stale_job_s)
        self.admission = Admission(engine, self.store, self.arena, self.pool, cfg.poison_ttl_s)
        self.device = DeviceLoop(engine, self.admission, self._arena_bytes, self.rows, cfg.depth, cfg.max_wait_ms)

    @property
    def pending_vit_tokens(self) -> int:
        """ViT tokens of the jobs admitted and not finished (autoscaling's signal)."""
        return self.admission.pending_vit_tokens

    @property
    def jobs_started(self) -> int:
        """Distinct items sent to preprocessing and the device."""
        return self.admission.jobs_started

    @property
    def jobs_device_tiled(self) -> int:
        return self.device.jobs_device_tiled

    @property
    def device_busy_s(self) -> float:
        return self.device.device_busy_s

    def submit(self, items: list[MediaInput], deadline: float | None = None, namespace: str = "",
               listener: ItemListener | None = None) -> Future[HeldRows]:
        """Start encoding one request; `deadline` is a time.monotonic() instant; `namespace` keeps cache
        entries apart (a tenant). Raises at once for what headers and the cache reveal (InvalidInput,
        BudgetExceeded, CacheMiss); everything later arrives through the future. Cancelling the future
        drops the request's work (and any job nobody else waits for). `listener` hears of each item as
        its rows are ready (streaming)."""
        return self.admission.submit(items, deadline, namespace, listener)

    def encode(self, items: list[MediaInput], deadline: float | None = None, namespace: str = "") -> Future[EncodeResult]:
        """`submit`, with the rows gathered into one tensor of the caller's own (the in-process path)."""
        held = self.submit(items, deadline, namespace)
        out: Future[EncodeResult] = Future()

        def finished(f: Future[HeldRows]) -> None:
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

        out.add_done_callback(lambda f: f.cancelled() and held.cancel())
        held.add_done_callback(finished)
        return out

    def release(self, held: HeldRows) -> None:
        """Give a finished request's rows back (cached rows stay in the cache, now unread)."""
        self.admission.release(held)

    def rows(self, region: Region) -> torch.Tensor:
        """A region's rows as a [rows, hidden] view of the arena."""
        nbytes = region.rows * self.engine.hidden_size * self.engine.dtype.itemsize
        raw = self._row_bytes[region.arena][region.offset : region.offset + nbytes]
        return raw.view(self.engine.dtype).view(region.rows, self.engine.hidden_size)

    def gather(self, held: HeldRows) -> EncodeResult:
        """One tensor of the caller's own (pinned on CUDA) holding every item's rows, in order."""
        items = held.items()
        out = self.engine.new_output(held.shape[0])
        for region, item in zip(held.regions, items):
            out[item.offset : item.offset + region.rows].copy_(self.rows(region))
        return EncodeResult("", out, items, held.stats)

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
        admission = self.admission
        with admission.lock:
            admission.closed = True
            admission.lock.notify_all()
        self.device.stop()
        self.pool.close()
        with admission.lock:
            stranded = admission.ready.drop(lambda job: True)
        admission.free_tiles([claim_tiles(job) for job in stranded])
        for job in stranded:
            admission.end_job(job, Unavailable("the encoder shut down before this request was encoded"))
        for region in [self._arena_bytes, *self._row_bytes.values()]:
            if region.is_pinned():
                torch.cuda.cudart().cudaHostUnregister(region.data_ptr())
