"""VisionEncoder = ragged ViT + projector: tiles in, LLM-width embeddings out."""

from __future__ import annotations

import torch
from torch import nn

from encoder_service.attention import RaggedAttention
from encoder_service.config import EncoderConfig
from encoder_service.models.projector import Projector
from encoder_service.models.vit import PackedTiles, VisionTransformer


class VisionEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.vit = VisionTransformer(cfg.vision)
        self.projector = Projector(cfg.projector, cfg.vision.hidden_size) if cfg.projector else None

    def tokens_out(self, grid: tuple[int, int]) -> int:
        """Embedding rows a tile of this patch grid produces."""
        ds = self.cfg.downsample
        return (grid[0] // ds) * (grid[1] // ds)

    def vit_tokens(self, grid: tuple[int, int]) -> int:
        """Rows a tile occupies inside the ragged ViT batch (patches + CLS/registers)."""
        return grid[0] * grid[1] + self.cfg.vision.num_prefix_tokens

    @torch.inference_mode()
    def forward(self, batch: PackedTiles, backend: RaggedAttention | None = None) -> torch.Tensor:
        x = self.vit(batch, backend)
        return self.projector(x, batch.grids) if self.projector is not None else x
