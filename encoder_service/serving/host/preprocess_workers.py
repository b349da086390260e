"""Out-of-process preprocessing: worker processes decode and tile media into the tile arena.

Decoding JPEGs and resizing them is CPU work that, in threads of the serving process,
fights the model thread and the gRPC event loop for the GIL (../shared/notes/served-path-profile.md).
Here each worker is a separate Python process running `preprocess.cpu`; the serving process sends
it one item at a time over a pipe (length-prefixed msgpack: no pickle) with an arena offset to write
the tiles at, and gets back a small status message. A dispatcher thread per worker does the
blocking I/O, with the GIL released. With device tiling on (GPUs), a worker only decodes an image
(RGB at its own size); the model process resizes and tiles it on the device (`preprocess.device`).

A job whose request is no longer live (cancelled, deadline passed) is never started,
and a worker still busy with one after `stale_job_s` is killed and replaced, so dead
requests never hold up the ones behind them. A worker that dies is restarted and its item
tried once more on a fresh worker; an item that kills a second worker is poison
(`PoisonInput`: INVALID_ARGUMENT for that item, never retried).

Workers run in a session of their own and ignore SIGINT and SIGTERM: a signal to the server's
process group (Ctrl-C, `kill -- -PGID`, a process manager stopping the group) reaches the server,
which drains, not its workers; they exit when their pipe closes.

    python -m encoder_service.serving.host.preprocess_workers --config JSON --tiles-fd N --tiles-size BYTES
"""

from __future__ import annotations

import logging
import mmap
import queue
import select
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from encoder_service.config import ProcessorConfig
from encoder_service.contract.errors import InvalidInput, PoisonInput, Unavailable
from encoder_service.contract.media import MediaInput, Modality, SampledFrames, Source
from encoder_service.contract.plan import ItemPlan
from encoder_service.preprocess.cpu import CpuPreprocessor
from encoder_service.serving.host import child
from encoder_service.serving.host.framing import read_frame, write_frame

log = logging.getLogger(__name__)

MODULE = "encoder_service.serving.host.preprocess_workers"


# ---------------------------------------------------------------- jobs (both sides)


def _job_message(item: MediaInput, offset: int, nbytes: int, plan: ItemPlan, decode_only: bool) -> dict:
    msg = {"offset": offset, "nbytes": nbytes, "modality": item.modality.value, "decode_only": decode_only}
    if plan.frames:  # the sampled frames the plan (and the token count) was made for
        msg["frame_indices"] = list(plan.frames.indices)
        msg["frame_size"] = list(plan.sizes[0])
    source = item.source
    if source == Source.RAW_PIXELS:
        data = np.ascontiguousarray(item.data)
        msg.update(source=source.value, shape=list(data.shape), data=memoryview(data).cast("B"))
    else:  # bytes, or a list of encoded frames
        msg.update(source=source.value, data=item.data)
    return msg


def _job_item(msg: dict) -> MediaInput:
    if msg["source"] == Source.RAW_PIXELS.value:
        data = np.frombuffer(msg["data"], dtype=np.uint8).reshape(msg["shape"])
    else:
        data = msg["data"]
    return MediaInput(Modality(msg["modality"]), data)


# ---------------------------------------------------------------- serving-process side


class WorkerDied(Unavailable):
    """A preprocessing worker process exited while it held an item."""


@dataclass
class _Job:
    item: MediaInput
    plan: ItemPlan
    nbytes: int
    decode_only: bool
    is_live: Callable[[], bool]
    done: Callable[[int | None, BaseException | None, list[float]], None]
    deaths: int = 0  # workers this item was with when they died


class _Worker:
    def __init__(self, config: dict, arena):
        self._config, self._arena = config, arena
        self.proc = None
        self.busy = False  # a job was sent and its reply has not come back

    def start(self, timeout_s: float = 120.0) -> None:
        self.proc = child.spawn(MODULE, self._config, {"tiles": (self._arena.fd, self._arena.size)})
        if not child.started(self.proc, timeout_s) or read_frame(self.proc.stdout.fileno()) != {"ready": True}:
            self.kill()
            raise RuntimeError("preprocessing worker did not start")

    def call(self, message: dict, is_live: Callable[[], bool], stale_job_s: float) -> dict | None:
        """Send a job and wait for its reply. None: the job went stale and the worker was replaced."""
        self.busy = True
        try:
            return self._call(message, is_live, stale_job_s)
        finally:
            self.busy = False

    def _call(self, message: dict, is_live: Callable[[], bool], stale_job_s: float) -> dict | None:
        write_frame(self.proc.stdin.fileno(), message)
        out, started, dead_since = self.proc.stdout.fileno(), time.monotonic(), None
        while True:
            ready, _, _ = select.select([out], [], [], 0.05)
            if ready:
                reply = read_frame(out)
                if reply is None:
                    raise WorkerDied(f"preprocessing worker exited with code {self.proc.wait()}")
                return reply
            if not is_live():
                dead_since = dead_since or time.monotonic()
                if time.monotonic() - max(dead_since, started) >= stale_job_s:
                    self.kill()
                    self.start()
                    return None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                stream.close()


class PreprocessPool:
    """`workers` processes decoding/tiling into `arena`; `submit` never blocks the caller."""

    def __init__(self, processor: ProcessorConfig, arena, workers: int, stale_job_s: float = 0.25):
        self.arena = arena
        self.stale_job_s = stale_job_s
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._workers = [_Worker(processor.to_dict(), arena) for _ in range(max(1, workers))]
        starters = [threading.Thread(target=w.start) for w in self._workers]  # start in parallel
        for t in starters:
            t.start()
        for t in starters:
            t.join()
        if any(w.proc is None or w.proc.poll() is not None for w in self._workers):
            self.close()
            raise RuntimeError("preprocessing workers failed to start")
        self._threads = [
            threading.Thread(target=self._dispatch, args=(w,), name=f"preprocess-dispatch-{i}", daemon=True)
            for i, w in enumerate(self._workers)
        ]
        for t in self._threads:
            t.start()

    def submit(
        self,
        item: MediaInput,
        plan: ItemPlan,
        is_live: Callable[[], bool],
        done: Callable[[int | None, BaseException | None, list[float]], None],
        decode_only: bool = False,
    ) -> None:
        """Decode and tile `item` into the arena (`plan.nbytes` at some offset), then `done(offset, None,
        frame_times)`; the caller frees the offset once the pixels are consumed. Failure: `done(None, error,
        [])`; a job dropped because it stopped being live: `done(None, None, [])`. `decode_only`: an image
        is only decoded (RGB at its own size, `plan.decode_pixels` x 3 bytes): the device tiles it."""
        nbytes = plan.decoded_nbytes if decode_only else plan.nbytes
        self._jobs.put(_Job(item, plan, nbytes, decode_only, is_live, done))

    def _dispatch(self, worker: _Worker) -> None:
        while (job := self._jobs.get()) is not None:
            offset = None
            try:
                offset = self.arena.alloc(job.nbytes, keep_waiting=job.is_live) if job.is_live() else None
                if offset is None:
                    job.done(None, None, [])
                    continue
                message = _job_message(job.item, offset, job.nbytes, job.plan, job.decode_only)
                reply = worker.call(message, job.is_live, self.stale_job_s)
                if reply is None:
                    self.arena.free(offset)
                    job.done(None, None, [])
                elif reply["ok"]:
                    job.done(offset, None, reply.get("times", []))
                else:
                    self.arena.free(offset)
                    error = InvalidInput(reply["error"]) if reply["invalid"] else RuntimeError(reply["error"])
                    job.done(None, error, [])
            except Exception as e:  # a dead worker (or a broken pipe to it): replace it, try the item once more
                if offset is not None:
                    self.arena.free(offset)
                job.deaths += 1
                log.error("preprocessing worker failed on an item (%d time(s)): %s; restarting it", job.deaths, e)
                if job.deaths < 2:
                    self._jobs.put(job)
                else:
                    job.done(None, PoisonInput(f"the item crashed the preprocessing worker decoding it, twice "
                                               f"({e}); it will not be tried again"), [])
                worker.kill()
                try:
                    worker.start()
                except Exception:
                    log.exception("could not restart a preprocessing worker")

    def close(self) -> None:
        for _ in self._workers:
            self._jobs.put(None)
        for t in getattr(self, "_threads", []):
            t.join(timeout=5)
        for w in self._workers:
            w.kill()


# ---------------------------------------------------------------- worker side


def worker_main(argv: list[str] | None = None) -> int:
    args = child.child_args(("tiles",), argv)
    arena = mmap.mmap(args.tiles_fd, args.tiles_size)
    processor = CpuPreprocessor(ProcessorConfig.from_dict(args.config))
    inp, out = child.child_pipes()
    write_frame(out, {"ready": True})
    while (job := read_frame(inp)) is not None:
        try:
            pixels = np.ndarray((job["nbytes"],), np.uint8, buffer=arena, offset=job["offset"])
            if job.get("decode_only"):  # the device resizes and tiles it
                processor.decode_into(_job_item(job), pixels)
                times = []
            else:
                plan = None
                if "frame_indices" in job:  # a video container: decode the frames the server planned for
                    indices, size = tuple(job["frame_indices"]), tuple(job["frame_size"])
                    plan = ItemPlan((size,) * len(indices), 0, frames=SampledFrames(indices, 0.0))
                times = processor.process_into(_job_item(job), pixels, plan)
            reply = {"ok": True, "times": times}
        except InvalidInput as e:
            reply = {"ok": False, "invalid": True, "error": str(e)}
        except Exception as e:  # reported to the server as an internal error; the worker goes on
            reply = {"ok": False, "invalid": False, "error": f"{type(e).__name__}: {e}"}
        write_frame(out, reply)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
