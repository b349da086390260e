"""Our ragged ViT, loaded from a HF SigLIP checkpoint dir, must match transformers' SiglipVisionModel."""

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from encoder_service.models import load_checkpoint, patchify


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        vision_use_head=True,  # the pooling head is saved and must be ignored by our loader
    )
    model = SiglipVisionModel(cfg)
    with torch.no_grad():  # fresh random non-trivial norms/biases, not just the init defaults
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(path)
    return path


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_matches_transformers_at_native_size(siglip_dir):
    hf = SiglipVisionModel.from_pretrained(siglip_dir).eval()
    ours = load_checkpoint(siglip_dir)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=pixels).last_hidden_state
    out = ours(patchify(pixels, 8)).reshape(ref.shape)
    assert _rel_err(out, ref) < 1e-4


def test_ragged_batch_of_mixed_sizes_matches_each_image_alone(siglip_dir):
    """Different grid sizes in ONE ragged forward == HF with interpolated positions, image by image."""
    hf = SiglipVisionModel.from_pretrained(siglip_dir).eval()
    ours = load_checkpoint(siglip_dir)
    images = [torch.randn(3, h, w) for h, w in [(32, 32), (48, 64), (16, 40), (56, 24)]]
    out = ours(patchify(images, 8))
    start = 0
    for img in images:
        with torch.no_grad():
            ref = hf(pixel_values=img[None], interpolate_pos_encoding=True).last_hidden_state[0]
        assert _rel_err(out[start : start + ref.shape[0]], ref) < 1e-4
        start += ref.shape[0]
    assert start == out.shape[0]
