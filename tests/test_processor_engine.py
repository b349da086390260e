"""The pure token-count function must agree with what the engine really returns."""

import numpy as np
import pytest
import torch

from encoder_service.contract.errors import BudgetExceeded, InvalidInput
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.contract.tokens import TilingSpec, choose_grid, count_image_tiles, count_image_tokens
from tests.conftest import image_bytes


def test_token_count_function_matches_engine_for_random_sizes(engine):
    rng = np.random.default_rng()
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 700, size=(30, 2))]
    sizes += [(1, 1), (1000, 7), (7, 1000), (64, 64), (128, 64), (640, 480)]
    spec = engine.tiling
    for chunk in range(0, len(sizes), 12):
        batch = sizes[chunk : chunk + 12]
        items = [MediaInput(Modality.IMAGE, rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in batch]
        out = engine.encode(items)
        assert out.token_counts == [count_image_tokens(w, h, spec) for w, h in batch]
        assert [i.num_tiles for i in out.items] == [count_image_tiles(w, h, spec) for w, h in batch]
        assert out.embeddings.shape == (sum(out.token_counts), engine.info().hidden_size)


def test_video_counts_per_frame(engine):
    frames = np.random.default_rng().integers(0, 256, (5, 40, 72, 3), dtype=np.uint8)
    out = engine.encode([MediaInput(Modality.VIDEO, frames)])
    assert [i.tokens_per_frame for i in out.items] == [[engine.tiling.tokens_per_tile] * 5]
    assert out.token_counts == [5 * engine.tiling.tokens_per_tile]


def test_grid_choice_respects_limits_and_aspect():
    spec = TilingSpec(tile_size=512, max_tiles=12, tokens_per_tile=256)
    for w, h in [(1024, 512), (512, 1024), (4000, 300), (300, 4000), (777, 777)]:
        cols, rows = choose_grid(w, h, spec)
        assert 1 <= cols * rows <= 12
    assert choose_grid(1024, 512, spec) == (2, 1)
    assert choose_grid(512, 1024, spec) == (1, 2)
    assert count_image_tiles(512, 512, spec) == 1  # one tile: no thumbnail
    assert count_image_tiles(1024, 512, spec) == 3  # two tiles + thumbnail


def test_tiles_pack_across_batches_without_changing_results(engine, tiny_checkpoint):
    """A small ViT-token budget splits a request into many forwards; outputs must not change."""
    from encoder_service.config import EngineConfig
    from encoder_service.engine import EncoderEngine

    small = EncoderEngine(EngineConfig(checkpoint=str(tiny_checkpoint), max_tokens_per_batch=3 * 67))
    items = [MediaInput(Modality.IMAGE, image_bytes(w, h)) for w, h in [(300, 100), (64, 64), (90, 200)]]
    a, b = engine.encode(items), small.encode(items)
    assert b.extras["batches"] > a.extras["batches"]
    torch.testing.assert_close(a.embeddings, b.embeddings, rtol=1e-5, atol=1e-5)


def test_engine_validation_errors(engine):
    with pytest.raises(InvalidInput, match="no items"):
        engine.encode([])
    with pytest.raises(InvalidInput, match="undecodable"):
        engine.encode([MediaInput(Modality.IMAGE, b"not an image at all")])
    with pytest.raises(InvalidInput, match="empty"):
        engine.encode([MediaInput(Modality.IMAGE, b"")])
    with pytest.raises(InvalidInput, match="zero-size"):
        engine.encode([MediaInput(Modality.IMAGE, np.zeros((0, 10, 3), np.uint8))])
    with pytest.raises(BudgetExceeded):
        engine.encode([MediaInput(Modality.IMAGE, image_bytes(640, 480))] * 30)
