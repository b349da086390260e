"""Dynamic batching: concurrent Encode requests become one ragged batch under a token budget.

Each request is validated and preprocessed on its own (bad input fails alone, never
its batch-mates), then queued. The batch loop takes the oldest request, keeps adding
queued ones while their ViT tokens fit `max_tokens_per_batch` (waiting at most
`max_wait_ms` for company), runs the engine once on the model thread and hands every
request its rows of the single output tensor. While a batch runs, new arrivals queue,
so batches grow with load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from encoder_service.engine import EncodeOutput, EncoderEngine
from encoder_service.errors import DeadlineExceeded
from encoder_service.processor import MediaInput, ProcessedItem

log = logging.getLogger(__name__)


@dataclass
class BatcherConfig:
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for company
    preprocess_threads: int = 4  # requests decoded/tiled concurrently


@dataclass
class _Pending:
    processed: list[ProcessedItem]
    vit_tokens: int
    deadline: float | None
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class RequestBatcher:
    def __init__(self, engine: EncoderEngine, cfg: BatcherConfig | None = None):
        self.engine = engine
        self.cfg = cfg or BatcherConfig()
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder-model")
        self._prepare_threads = ThreadPoolExecutor(self.cfg.preprocess_threads, thread_name_prefix="encoder-prep")
        self._queue: asyncio.Queue[_Pending] | None = None
        self._carry: _Pending | None = None
        self._loop_task: asyncio.Task | None = None

    async def submit(self, items: list[MediaInput], deadline: float | None = None) -> EncodeOutput:
        """Encode one request's items; `deadline` is a time.monotonic() instant."""
        loop = asyncio.get_running_loop()
        if self._loop_task is None:  # started lazily: needs the serving event loop
            self._queue = asyncio.Queue()
            self._loop_task = loop.create_task(self._batch_loop())
        processed = await loop.run_in_executor(self._prepare_threads, self.engine.prepare, items)
        tiles = sum(p.num_tiles for p in processed)
        pending = _Pending(processed, tiles * self.engine.vit_tokens_per_tile, deadline, loop.create_future())
        await self._queue.put(pending)
        return await pending.future

    async def _next(self, timeout: float | None) -> _Pending | None:
        if self._carry is not None:
            pending, self._carry = self._carry, None
            return pending
        if timeout is None:
            return await self._queue.get()
        try:
            return await asyncio.wait_for(self._queue.get(), max(timeout, 0.0))
        except asyncio.TimeoutError:
            return None

    async def _batch_loop(self) -> None:
        """Never dies on an error: a batch that fails fails its requests, and the loop goes on
        (a dead loop would leave every later request waiting forever)."""
        while True:
            batch: list[_Pending] = []
            try:
                await self._form_and_run(batch)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("encoder batch failed")
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)

    async def _form_and_run(self, batch: list[_Pending]) -> None:
        """One batch: the oldest request, plus queued ones while they fit, then one engine run.

        Requests are appended to `batch` as they are taken, so the caller can fail them all
        if anything goes wrong."""
        loop = asyncio.get_running_loop()
        budget = self.engine.cfg.max_tokens_per_batch
        batch.append(await self._next(None))
        tokens = batch[0].vit_tokens
        wait_until = loop.time() + self.cfg.max_wait_ms / 1e3
        while tokens < budget:
            nxt = await self._next(wait_until - loop.time())
            if nxt is None:
                break
            if tokens + nxt.vit_tokens > budget:
                self._carry = nxt  # first in line for the next batch
                break
            batch.append(nxt)
            tokens += nxt.vit_tokens
        live = self._drop_expired(batch)
        if live:
            await self._run(live)

    def _drop_expired(self, batch: list[_Pending]) -> list[_Pending]:
        now, live = time.monotonic(), []
        for p in batch:
            if p.future.done():  # cancelled by the caller
                continue
            if p.deadline is not None and now > p.deadline:
                p.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            live.append(p)
        return live

    async def _run(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        items = [item for p in batch for item in p.processed]
        out = await loop.run_in_executor(self._model_thread, self.engine.run, items)
        first = 0
        for p in batch:
            part = out.select(first, first + len(p.processed))
            first += len(p.processed)
            part.stats.update(
                queue_ms=1e3 * (started - p.enqueued),
                batch_requests=len(batch),
                batch_items=len(items),
            )
            if not p.future.done():
                p.future.set_result(part)

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        self._prepare_threads.shutdown(wait=False, cancel_futures=True)
