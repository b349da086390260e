"""The VLM projector: 2x2 pixel shuffle (4x fewer tokens, 4x wider) then an MLP to the LLM width."""

from __future__ import annotations

import torch
from torch import nn

from encoder_service.config import ProjectorConfig


def pixel_shuffle(x: torch.Tensor, grids: list[tuple[int, int]], factor: int) -> torch.Tensor:
    """[sum(gh*gw), C] -> [sum(gh*gw/f^2), C*f^2], tile by tile.

    Each output token gathers an f x f neighbourhood; channels are ordered
    (row offset, column offset, channel), the order InternVL/Nemotron use.
    """
    if factor == 1:
        return x
    out, start, c = [], 0, x.shape[-1]
    for (gh, gw), count in _runs(grids):
        n = count * gh * gw
        if gh % factor or gw % factor:
            raise ValueError(f"grid {gh}x{gw} is not divisible by the shuffle factor {factor}")
        t = x[start : start + n].reshape(count, gh // factor, factor, gw // factor, factor, c)
        out.append(t.permute(0, 1, 3, 2, 4, 5).reshape(-1, factor * factor * c))
        start += n
    return torch.cat(out)


def _runs(grids: list[tuple[int, int]]) -> list[tuple[tuple[int, int], int]]:
    """Run-length encode consecutive equal grids, so equal tiles shuffle in one op."""
    runs: list[tuple[tuple[int, int], int]] = []
    for g in grids:
        if runs and runs[-1][0] == g:
            runs[-1] = (g, runs[-1][1] + 1)
        else:
            runs.append((g, 1))
    return runs


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, vision_hidden: int):
        super().__init__()
        self.cfg = cfg
        width = vision_hidden * cfg.downsample**2
        self.norm = nn.LayerNorm(width, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(width, cfg.hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.hidden_size, cfg.output_size)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        x = pixel_shuffle(x, grids, self.cfg.downsample)
        return self.fc2(self.act(self.fc1(self.norm(x))))
