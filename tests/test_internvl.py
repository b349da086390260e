"""InternVL checkpoints in the Hugging Face format: the checkpoint vLLM serves, loaded through our loader,
against Hugging Face transformers' own InternVL (its PIL image processor + model; this environment has no
torchvision, so the torchvision-resampled default is checked against vLLM itself in tests/test_vllm.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from encoder_service.config import EngineConfig
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.contract.tokens import count_image_tokens
from encoder_service.engine import EncoderEngine
from encoder_service.integrations.vllm.tiny_model import build
from tests.conftest import image_bytes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny checkpoint, its image processor saved as the PIL one (the reference this file can run)."""
    path = build(tmp_path_factory.mktemp("tiny-internvl"))
    saved = json.loads((path / "processor_config.json").read_text())
    saved["image_processor"]["image_processor_type"] = "GotOcr2ImageProcessorPil"
    (path / "processor_config.json").write_text(json.dumps(saved))
    return path


@pytest.fixture(scope="module")
def reference(checkpoint):
    from transformers import InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    settings = json.loads((checkpoint / "processor_config.json").read_text())["image_processor"]
    settings.pop("image_processor_type")
    model = InternVLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return GotOcr2ImageProcessorPil(**settings), model


def test_rows_and_counts_equal_transformers_internvl(checkpoint, reference):
    processor, model = reference
    engine = EncoderEngine(EngineConfig(checkpoint=str(checkpoint), device="cpu", max_tokens_per_batch=4096))
    assert engine.preprocessor.cfg.resize == "pil"
    rng = np.random.default_rng()
    sizes = [(64, 64), (200, 90), (90, 200), (150, 100), (333, 77), (500, 400)]
    items = [MediaInput(Modality.IMAGE, image_bytes(w, h, seed=int(rng.integers(1 << 30)))) for w, h in sizes]
    ours = engine.encode(items)
    for (w, h), item, rows in zip(sizes, items, ours.split()):
        import io

        from PIL import Image

        pixels = processor(images=[Image.open(io.BytesIO(item.data)).convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            theirs = model.model.get_image_features(pixels["pixel_values"], vision_feature_layer=-1,
                                                    vision_feature_select_strategy="default").pooler_output
        theirs = theirs.reshape(-1, theirs.shape[-1])
        assert rows.shape == theirs.shape, (w, h)
        assert int(pixels["num_patches"][0]) * engine.tiling.tokens_per_tile == rows.shape[0]
        assert count_image_tokens(w, h, engine.tiling) == rows.shape[0]
        assert ((rows - theirs).norm() / theirs.norm()).item() < 1e-5, (w, h)


def test_refuses_what_it_cannot_apply(checkpoint, tmp_path):
    import shutil

    from encoder_service.models.checkpoint import inspect_checkpoint

    copy = tmp_path / "qk-norm"
    shutil.copytree(checkpoint, copy)
    config = json.loads((copy / "config.json").read_text())
    config["vision_config"]["use_qk_norm"] = True
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="use_qk_norm"):
        inspect_checkpoint(copy)
    config["vision_config"]["use_qk_norm"] = False
    config["vision_feature_layer"] = -2
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vision_feature_layer"):
        inspect_checkpoint(copy)


def test_torchvision_processors_resample_as_torchvision_does(tmp_path):
    from encoder_service.models.checkpoint import checkpoint_config

    assert checkpoint_config(build(tmp_path / "default")).processor.resize == "torch-aa"
