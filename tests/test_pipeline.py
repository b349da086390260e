"""The serving pipeline on a real engine with real worker processes: batching, failures, dead requests."""

import dataclasses
import io
import os
import signal
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest
import torch
from PIL import Image

from encoder_service.contract.errors import DeadlineExceeded, InvalidInput, PoisonInput, Unavailable
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.contract.wire.status import reason_for, status_for
from encoder_service.engine import EncoderEngine
from encoder_service.serving.host.pipeline import EncodePipeline, PipelineConfig
from tests.conftest import image_bytes, wait_for


class FailsOnce(EncoderEngine):
    """A real engine whose first forward blows up (e.g. a transient CUDA error)."""

    failed = False

    def launch(self, pixels, sizes, outputs):
        if not self.failed:
            self.failed = True
            raise RuntimeError("transient device failure")
        return super().launch(pixels, sizes, outputs)


def _items(*sizes):
    return [MediaInput(Modality.IMAGE, image_bytes(w, h)) for w, h in sizes]


@pytest.fixture
def pipeline(engine):
    p = EncodePipeline(engine, PipelineConfig(preprocess_workers=1, arena_mb=16))
    yield p
    p.close()


def test_results_equal_the_engine_and_the_arena_drains(pipeline, engine):
    rng = np.random.default_rng()
    items = _items((321, 123), (64, 64), (500, 200)) + [
        MediaInput(Modality.VIDEO, rng.integers(0, 256, (4, 40, 50, 3), dtype=np.uint8)),
        MediaInput(Modality.IMAGE, rng.integers(0, 256, (33, 77, 3), dtype=np.uint8)),
    ]
    out = pipeline.encode(items).result(timeout=60)
    ref = engine.encode(items)
    assert out.token_counts == ref.token_counts
    assert [i.tokens_per_frame for i in out.items] == [i.tokens_per_frame for i in ref.items]
    torch.testing.assert_close(out.embeddings, ref.embeddings, rtol=1e-5, atol=1e-5)
    assert {"preprocess_ms", "queue_ms", "forward_ms", "batches"} <= set(out.extras)
    assert pipeline.arena.wait_idle(5)


def test_failed_batch_fails_its_requests_and_the_pipeline_keeps_serving(engine_config):
    pipeline = EncodePipeline(FailsOnce(engine_config), PipelineConfig(preprocess_workers=1, arena_mb=16))
    try:
        with pytest.raises(RuntimeError, match="transient"):
            pipeline.encode(_items((64, 64))).result(timeout=60)
        assert pipeline.encode(_items((64, 64))).result(timeout=60).token_counts == [16]
        assert pipeline.arena.wait_idle(5)
    finally:
        pipeline.close()


def test_concurrent_requests_merge_within_the_token_budget(engine):
    """Budget 1024 ViT tokens = 15 tiles of 67: single-tile requests share batches of at most 15."""
    pipeline = EncodePipeline(engine, PipelineConfig(preprocess_workers=2, arena_mb=16, max_wait_ms=500))
    try:
        requests = [_items((64, 64)) for _ in range(20)]
        outs = [f.result(timeout=60) for f in [pipeline.encode(items) for items in requests]]
    finally:
        pipeline.close()
    assert max(o.extras["batch_tiles"] for o in outs) == 15
    assert max(o.extras["batch_requests"] for o in outs) == 15
    for items, out in zip(requests, outs):
        torch.testing.assert_close(out.embeddings, engine.encode(items).embeddings, rtol=1e-5, atol=1e-5)


def test_header_errors_raise_at_once_and_decode_errors_through_the_future(pipeline):
    with pytest.raises(InvalidInput, match="no items"):
        pipeline.encode([])
    bad_pixels = b"\x89PNG\r\n\x1a\n" + image_bytes(40, 40)[8:60]  # a PNG header, then garbage
    future = pipeline.encode(_items((64, 64)) + [MediaInput(Modality.IMAGE, bad_pixels)])
    with pytest.raises(InvalidInput):
        future.result(timeout=60)
    assert pipeline.encode(_items((64, 64))).result(timeout=60).token_counts == [16]
    assert pipeline.arena.wait_idle(5)


def test_expired_and_cancelled_requests_free_everything(pipeline):
    expired = pipeline.encode(_items((600, 400), (500, 500)), deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        expired.result(timeout=60)
    cancelled = pipeline.encode(_items(*[(600, 400)] * 8))
    cancelled.cancel()
    with pytest.raises(CancelledError):
        cancelled.result(timeout=1)
    assert pipeline.encode(_items((64, 64))).result(timeout=60).token_counts == [16]
    assert pipeline.arena.wait_idle(10)


def test_a_worker_busy_with_a_dead_request_is_replaced(engine_config):
    """A huge image whose caller gave up must not hold the worker the next request needs."""
    slow = dataclasses.replace(engine_config, max_tokens_per_request=1 << 20)
    pipeline = EncodePipeline(EncoderEngine(slow), PipelineConfig(preprocess_workers=1, arena_mb=64, stale_job_s=0.0))
    try:
        worker = pipeline.pool._workers[0]
        pid = worker.proc.pid
        buf = io.BytesIO()
        Image.new("RGB", (6000, 4000), (200, 30, 90)).save(buf, format="PNG")  # tiny file, a long decode
        big = [MediaInput(Modality.IMAGE, buf.getvalue())]
        doomed = pipeline.encode(big, deadline=time.monotonic() + 0.05)
        with pytest.raises(DeadlineExceeded):
            doomed.result(timeout=60)
        assert pipeline.encode(_items((64, 64))).result(timeout=60).token_counts == [16]
        assert worker.proc.pid != pid  # killed mid-decode and replaced
        assert pipeline.arena.wait_idle(5)
    finally:
        pipeline.close()


def test_a_dead_worker_is_replaced_and_its_item_tried_again(pipeline):
    worker = pipeline.pool._workers[0]
    worker.proc.kill()
    worker.proc.wait()
    assert pipeline.encode(_items((64, 64))).result(timeout=60).token_counts == [16]
    assert pipeline.arena.wait_idle(5)


def _kill_while_busy(worker, old_pid: int | None) -> int:
    """Kill the worker (a fresh one when `old_pid` is given) while it holds a job; its pid."""
    assert wait_for(lambda: worker.busy and worker.proc.pid != old_pid and worker.proc.poll() is None, 60, 0.005)
    pid = worker.proc.pid
    time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_an_item_that_kills_two_workers_is_poison_and_refused_at_once(engine_config):
    """A worker dying under an item is replaced and the item tried once more; dying again, the item is poison
    (INVALID_ARGUMENT, reason POISON, for that item only) and is refused without a try for a while."""
    slow = dataclasses.replace(engine_config, max_tokens_per_request=1 << 20)
    pipeline = EncodePipeline(EncoderEngine(slow), PipelineConfig(preprocess_workers=1, arena_mb=64))
    try:
        buf = io.BytesIO()
        Image.new("RGB", (8000, 8000), (10, 200, 90)).save(buf, format="PNG")  # tiny file, a long decode
        poison = MediaInput(Modality.IMAGE, buf.getvalue(), item_id="p")
        worker = pipeline.pool._workers[0]
        future = pipeline.encode(_items((64, 64)) + [poison])
        first = _kill_while_busy(worker, None)
        second = _kill_while_busy(worker, first)
        with pytest.raises(PoisonInput) as failed:
            future.result(timeout=120)
        assert failed.value.item_index == 1 and status_for(failed.value).name == "INVALID_ARGUMENT"
        assert reason_for(failed.value) == "POISON"
        # The item fails before its worker is replaced: wait for the replacement, then watch it stay idle.
        assert wait_for(lambda: worker.proc.pid != second and worker.proc.poll() is None, 60)
        pid = worker.proc.pid
        with pytest.raises(PoisonInput):
            pipeline.encode([poison])  # at once, at admission: no worker tries it again
        assert worker.proc.pid == pid and not worker.busy
        assert pipeline.encode(_items((64, 64))).result(timeout=60).token_counts == [16]
        assert pipeline.arena.wait_idle(5)
    finally:
        pipeline.close()


def test_closed_pipeline_refuses_work(engine):
    pipeline = EncodePipeline(engine, PipelineConfig(preprocess_workers=1, arena_mb=16))
    pipeline.close()
    with pytest.raises(Unavailable):
        pipeline.encode(_items((64, 64)))


class Fatal(BaseException):
    """Something no batch-level handler catches (a bug, an interpreter-level failure)."""


class DiesOnLaunch(EncoderEngine):
    def launch(self, pixels, sizes, outputs):
        raise Fatal("model thread crash")


def test_a_dead_model_thread_fails_requests_instead_of_hanging(engine_config):
    pipeline = EncodePipeline(DiesOnLaunch(engine_config), PipelineConfig(preprocess_workers=1, arena_mb=16))
    try:
        with pytest.raises(Unavailable):
            pipeline.encode(_items((64, 64))).result(timeout=60)
        with pytest.raises(Unavailable):  # and it says so to new requests
            pipeline.encode(_items((64, 64))).result(timeout=60)
    finally:
        pipeline.close()
