"""The request batcher on a real engine: merging under the token budget, and surviving failures."""

import asyncio

import pytest
import torch

from encoder_service.engine import EncoderEngine
from encoder_service.processor import MediaInput, Modality
from encoder_service.request_batcher import BatcherConfig, RequestBatcher
from tests.conftest import image_bytes


class FailsOnce(EncoderEngine):
    """A real engine whose first forward blows up (e.g. a transient CUDA error)."""

    failed = False

    def run(self, processed, deadline=None, output_device="cpu"):
        if not self.failed:
            self.failed = True
            raise RuntimeError("transient device failure")
        return super().run(processed, deadline, output_device)


def _items(*sizes):
    return [MediaInput(Modality.IMAGE, image_bytes(w, h)) for w, h in sizes]


def test_failed_batch_fails_its_requests_and_the_loop_keeps_serving(engine_config):
    batcher = RequestBatcher(FailsOnce(engine_config), BatcherConfig(max_wait_ms=1))

    async def scenario():
        with pytest.raises(RuntimeError, match="transient"):
            await batcher.submit(_items((64, 64)))
        return await batcher.submit(_items((64, 64)))

    out = asyncio.run(scenario())
    assert out.token_counts == [16]
    batcher.close()


def test_concurrent_requests_merge_within_the_token_budget(engine_config, engine):
    """Budget 1024 ViT tokens = 15 tiles of 67: single-tile requests merge up to 15 per batch."""
    batcher = RequestBatcher(engine, BatcherConfig(max_wait_ms=200))
    requests = [_items((64, 64)) for _ in range(20)]

    async def scenario():
        return await asyncio.gather(*(batcher.submit(items) for items in requests))

    outs = asyncio.run(scenario())
    sizes = [o.stats["batch_requests"] for o in outs]
    assert max(sizes) == 15 and sum(1 / s for s in sizes) == pytest.approx(2)  # two batches: 15 + 5
    for items, out in zip(requests, outs):
        torch.testing.assert_close(out.embeddings, engine.encode(items).embeddings, rtol=1e-5, atol=1e-5)
    batcher.close()
