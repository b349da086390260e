import json

import pytest
import torch

from encoder_service.config import tiny_encoder_config
from encoder_service.models import load_checkpoint, patchify, save_checkpoint, tiny_checkpoint_dir
from encoder_service.models.checkpoint import random_encoder


def test_tiny_default_is_deterministic(tmp_path):
    a = load_checkpoint(tiny_checkpoint_dir(tmp_path / "a"))
    b = load_checkpoint(tiny_checkpoint_dir(tmp_path / "b"))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_save_load_roundtrip_gives_same_outputs(tmp_path):
    model = random_encoder(tiny_encoder_config(), seed=7)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "ck"))
    batch = patchify(torch.randn(4, 3, 64, 64), 8)
    torch.testing.assert_close(loaded(batch), model(batch), rtol=0, atol=0)
    assert loaded(batch).shape == (4 * 16, tiny_encoder_config().output_size)


def test_loader_rejects_mismatched_weights(tmp_path):
    path = save_checkpoint(random_encoder(tiny_encoder_config()), tmp_path / "ck")
    cfg = json.loads((path / "config.json").read_text())
    cfg["vision"]["num_layers"] += 1
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(path)


def test_loader_rejects_unknown_model_type(tmp_path):
    path = save_checkpoint(random_encoder(tiny_encoder_config()), tmp_path / "ck")
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported model_type"):
        load_checkpoint(path)
