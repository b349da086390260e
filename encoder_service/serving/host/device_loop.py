"""The device loop: two threads that keep the device busy with the pieces admission made ready.

- the model thread packs the ready pieces of any jobs into a batch under the token budget, launches
  host-to-device copy (of a decoded image: then its resize and tiling on the device) + forward +
  device-to-host copy into each job's rows, and goes straight on to the next batch: up to `depth`
  batches are in flight on the device;
- the completion thread waits for each batch's CUDA event (GIL released), frees tile arena space,
  prunes finished videos (EVS) and hands finished jobs to admission, which publishes and delivers them.
A stage thread that dies fails every request waiting on it and closes admission to new ones.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from encoder_service.batching import PieceSource, Span, batch_inputs
from encoder_service.contract.errors import ItemError, Unavailable
from encoder_service.serving.host.admission import Admission, Job, claim_tiles

if TYPE_CHECKING:
    from encoder_service.engine import EncoderEngine

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Batch:
    spans: list[Span[Job]]
    started: float
    event: torch.cuda.Event | None = None
    error: BaseException | None = None


class DeviceLoop:
    def __init__(self, engine: EncoderEngine, admission: Admission, tile_bytes: torch.Tensor, rows_of,
                 depth: int, max_wait_ms: float):
        """`tile_bytes`: the tile arena as flat uint8; `rows_of(region)`: a region's rows as a tensor."""
        self.engine, self.admission = engine, admission
        self._tile_bytes, self._rows_of = tile_bytes, rows_of
        self.depth, self.max_wait_ms = depth, max_wait_ms
        self.jobs_device_tiled = 0  # images resized and tiled on the device
        self.device_busy_s = 0.0  # time the device had a batch in flight (as the host sees it)
        self._last_completion = 0.0
        self._inflight = 0
        self._completions: queue.Queue[Batch | None] = queue.Queue()
        self.threads = [
            threading.Thread(target=self._guarded, args=(self._model_steps,), name="encoder-model", daemon=True),
            threading.Thread(target=self._guarded, args=(self._completion_steps,), name="encoder-completion",
                             daemon=True),
        ]
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        """Let both threads finish (admission is closed first: the model thread exits on its own)."""
        self.threads[0].join(timeout=30)
        self._completions.put(None)
        self.threads[1].join(timeout=30)

    def _guarded(self, loop) -> None:
        """A stage thread that dies must not leave requests waiting forever: fail them all, refuse new ones."""
        admission = self.admission
        try:
            loop()
        except BaseException as e:
            log.exception("encoder pipeline thread %s died", threading.current_thread().name)
            with admission.lock:
                admission.closed = True
                stranded = admission.ready.drop(lambda job: True)
                admission.lock.notify_all()
            error = Unavailable(f"the encoder failed ({type(e).__name__}); retry elsewhere")
            for job in stranded:
                admission.end_job(job, error)
            while True:  # batches the completion thread will never see
                try:
                    batch = self._completions.get_nowait()
                except queue.Empty:
                    break
                for span in batch.spans if batch else []:
                    admission.end_job(span.item, error)
            self._completions.put(None)

    # ------------------------------------------------------------------ the model thread

    def _model_steps(self) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.set_device(self.engine.device)
        admission = self.admission
        while True:
            with admission.lock:
                while not admission.closed and (not admission.ready or self._inflight >= self.depth):
                    admission.lock.wait()
                if admission.closed:
                    return
                self._wait_for_company()
                dropped = admission.ready.drop(lambda job: not job.is_live())
                # Tiles of a dropped job still in flight are freed by the completion thread.
                offsets = [claim_tiles(job) for job in dropped if job.tiles_done == job.tiles_launched]
                spans = admission.ready.take()
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
            admission.free_tiles(offsets)
            for job in dropped:
                admission.end_job(job, None)
            if spans:
                try:
                    self._completions.put(self._launch(spans))
                except BaseException:  # taken from the queue, never reaching completion: fail them here
                    for span in spans:
                        admission.end_job(span.item, Unavailable("the encoder failed; retry elsewhere"))
                    raise

    def _wait_for_company(self) -> None:
        """On an idle device, give concurrent arrivals `max_wait_ms` to join a batch under budget."""
        ready = self.admission.ready
        if self.max_wait_ms <= 0 or self._inflight:
            return
        until = time.monotonic() + self.max_wait_ms / 1e3
        while ready.queued_tokens < ready.max_tokens and not self.admission.closed:
            left = until - time.monotonic()
            if left <= 0:
                return
            self.admission.lock.wait(left)

    def _launch(self, spans: list[Span[Job]]) -> Batch:
        batch = Batch(spans, time.perf_counter())
        try:
            pixels, sizes, outputs = batch_inputs(spans, self._source)
            if pixels:
                batch.event = self.engine.launch(pixels, sizes, outputs)  # None on the CPU: done already
        except Exception as e:  # fails this batch's jobs; the pipeline goes on
            log.exception("encoder batch failed")
            batch.error = e
        return batch

    def _source(self, job: Job) -> PieceSource | None:
        """A job's pieces (None: it failed, e.g. its device tiling in this batch) and where its rows go."""
        if job.ended:
            return None
        if job.on_device:
            if (pixels := self._device_pixels(job)) is None:
                return None
        else:
            pixels = self._tile_bytes[job.offset : job.offset + job.plan.nbytes]
        target = job.scratch if job.scratch is not None else self._rows_of(job.region)
        return PieceSource(pixels, job.plan.sizes, job.rows, target)

    def _device_pixels(self, job: Job) -> torch.Tensor | None:
        """A device-tiled job's pieces, made at its first batch from the decoded image in the (page-locked)
        arena, on the model's stream. A failure (the decoded size, device memory) fails this job only."""
        if job.device_pixels is None:
            try:
                decoded = self._tile_bytes[job.offset : job.offset + job.plan.decoded_nbytes]
                image = decoded.to(self.engine.device, non_blocking=True).view(*job.plan.image_size, 3)
                job.device_pixels = self.engine.device_tiler.pieces(image, job.plan)
                self.jobs_device_tiled += 1
            except Exception as e:  # noqa: BLE001
                log.warning("device tiling failed for one item: %s", e)
                self.admission.end_job(job, e if isinstance(e, ItemError) else Unavailable(f"device tiling failed: {e}"))
                return None
        return job.device_pixels

    # ------------------------------------------------------------------ the completion thread

    def _completion_steps(self) -> None:
        admission = self.admission
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
            with admission.lock:
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
                        offsets.append(claim_tiles(job))
                for job in jobs:
                    if job.tiles_done != job.plan.num_tiles or batch.error or job.ended:
                        if (batch.error or job.ended) and job.tiles_done == job.tiles_launched:
                            ended.append(job)
                    elif job.scratch is not None:
                        to_prune.append(job)
                    else:
                        finished.append(job)
                admission.lock.notify_all()
            admission.free_tiles(offsets)
            for job in to_prune:  # the video's last frames are in: EVS picks the rows it keeps
                try:
                    job.region.tokens_per_frame = self.engine.prune_into(job.scratch, job.plan,
                                                                         self._rows_of(job.region))
                    job.scratch = None
                    finished.append(job)
                except Exception as e:  # noqa: BLE001 - fails this job only
                    log.exception("video pruning failed")
                    job.scratch = None
                    admission.end_job(job, e)
            for job in finished:
                if not job.region.tokens_per_frame:
                    job.region.tokens_per_frame = list(job.plan.tokens_per_frame)
                admission.finish_job(job)
            for job in ended:
                admission.end_job(job, batch.error)
