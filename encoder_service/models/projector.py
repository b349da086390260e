"""The VLM projector: pixel shuffle (f x f neighbouring patches -> one token f^2 x wider), then an MLP
to the LLM width. Two MLP layouts (ProjectorConfig.kind): this project's LayerNorm-GELU one and
Nemotron Nano VL's `mlp1` (RMSNorm, squared ReLU, no biases); optionally a LayerNorm over the ViT's
features first (Nemotron checkpoints trained with MTP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoder_service.config import ProjectorConfig
from encoder_service.models.vit import equal_runs


def pixel_shuffle(x: torch.Tensor, grids: list[tuple[int, int]], factor: int, version: str = "v2") -> torch.Tensor:
    """[sum(gh*gw), C] -> [sum(gh*gw/f^2), C*f^2], piece by piece.

    Each output token gathers an f x f neighbourhood, channels ordered (row offset, column
    offset, channel), as InternVL/Nemotron's pixel_shuffle produces them. Version "v2" orders
    the output tokens row-major; "v1" leaves them column-major (the original InternVL code
    never swapped the grid back, and checkpoints trained that way expect it).
    """
    if factor == 1:
        return x
    out, start, c = [], 0, x.shape[-1]
    for (gh, gw), count in equal_runs(grids):
        n = count * gh * gw
        if gh % factor or gw % factor:
            raise ValueError(f"grid {gh}x{gw} is not divisible by the shuffle factor {factor}")
        t = x[start : start + n].reshape(count, gh // factor, factor, gw // factor, factor, c)
        order = (0, 1, 3, 2, 4, 5) if version == "v2" else (0, 3, 1, 2, 4, 5)
        out.append(t.permute(*order).reshape(-1, factor * factor * c))
        start += n
    return out[0] if len(out) == 1 else torch.cat(out)


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, vision_hidden: int):
        super().__init__()
        self.cfg = cfg
        width = vision_hidden * cfg.downsample**2
        mlp1 = cfg.kind == "mlp1"
        if mlp1:
            self.norm = nn.RMSNorm(width, eps=cfg.layer_norm_eps)
        else:
            self.norm = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(width, cfg.hidden_size, bias=not mlp1)
        self.fc2 = nn.Linear(cfg.hidden_size, cfg.output_size, bias=not mlp1)
        self.act = _squared_relu if mlp1 else F.gelu
        if cfg.vision_norm_eps is not None:  # Nemotron's MTP checkpoints: LayerNorm before the shuffle
            self.vision_norm = nn.LayerNorm(vision_hidden, eps=cfg.vision_norm_eps)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        if self.cfg.vision_norm_eps is not None:
            x = self.vision_norm(x)
        x = pixel_shuffle(x, grids, self.cfg.downsample, self.cfg.ps_version)
        return self.fc2(self.act(self.fc1(self.norm(x))))


def _squared_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))
