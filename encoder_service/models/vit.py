"""A pre-norm Vision Transformer that runs on ragged (packed) batches of tiles.

All tiles of a batch are flattened into one `[total_tokens, hidden]` sequence;
attention is restricted to each tile by `indptr`, so tiles of any grid size
share one forward pass with no padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from encoder_service.attention import RaggedAttention, TorchRaggedAttention
from encoder_service.config import VisionConfig


@dataclass(frozen=True)
class PackedTiles:
    """Patches of several tiles, concatenated: what one ragged forward consumes."""

    patches: torch.Tensor  # [sum(gh*gw), C*p*p], channel-major inside a patch (Conv2d weight order)
    grids: list[tuple[int, int]]  # (rows, cols) of patches per tile

    @property
    def num_tiles(self) -> int:
        return len(self.grids)


def patchify_hwc(
    pixels: torch.Tensor, sizes: Sequence[tuple[int, int]], patch_size: int, channels: int = 3
) -> PackedTiles:
    """Flat pixels (pieces [h, w, C] back to back, any dtype) -> PackedTiles, patch rows in (C, p, p) order.

    Patchifying first and normalising after (per column) keeps the work on uint8 and lets
    runs of equal-size pieces (the tiles of an image, the frames of a video) go in one op.
    """
    p, c = patch_size, channels
    parts, grids, pos = [], [], 0
    for (h, w), count in equal_runs(list(sizes)):
        if h % p or w % p:
            raise ValueError(f"piece {h}x{w} is not a multiple of the patch size {p}")
        gh, gw = h // p, w // p
        n = count * h * w * c
        x = pixels[pos : pos + n].view(count, gh, p, gw, p, c).permute(0, 1, 3, 5, 2, 4)
        parts.append(x.reshape(count * gh * gw, c * p * p))
        grids += [(gh, gw)] * count
        pos += n
    return PackedTiles(parts[0] if len(parts) == 1 else torch.cat(parts), grids)


def equal_runs(sizes: list[tuple[int, int]]) -> list[tuple[tuple[int, int], int]]:
    """Run-length encode consecutive equal sizes/grids, so equal pieces share one op."""
    runs: list[tuple[tuple[int, int], int]] = []
    for g in sizes:
        if runs and runs[-1][0] == g:
            runs[-1] = (g, runs[-1][1] + 1)
        else:
            runs.append((g, 1))
    return runs


def patchify(tiles: torch.Tensor | Sequence[torch.Tensor], patch_size: int) -> PackedTiles:
    """[n, C, H, W] (or a list of [C, H, W] of any sizes, multiples of patch_size) -> PackedTiles."""
    if isinstance(tiles, torch.Tensor) and tiles.dim() == 4:
        n, c, h, w = tiles.shape
        gh, gw = h // patch_size, w // patch_size
        x = tiles.reshape(n, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 1, 3, 5)
        return PackedTiles(x.reshape(n * gh * gw, c * patch_size**2), [(gh, gw)] * n)
    parts = [patchify(t.unsqueeze(0), patch_size) for t in tiles]
    return PackedTiles(torch.cat([p.patches for p in parts]), [g for p in parts for g in p.grids])


def _activation(name: str):
    if name == "gelu":
        return F.gelu
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"unsupported hidden_act {name!r}")


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, backend: RaggedAttention, plan) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        return self.proj(backend.run(plan, q, k, v).reshape(x.shape[0], -1))


@dataclass(frozen=True)
class KernelOptions:
    """Inference speed-ups that change no weights (EngineConfig turns them on for CUDA).

    gelu_epilogue: fc1's bias and GELU run inside the cuBLASLt matmul epilogue instead of as
      a separate pass over the [tokens, 4*hidden] activations (the largest tensor of a block).
      The epilogue computes the tanh form of GELU; for a checkpoint trained with the exact
      (erf) form this differs by at most ~5e-4 per activation, under bf16's rounding of it.
    compile_norms: each residual add and the LayerNorm after it run as one kernel
      (torch.compile), instead of an add and a norm that each read the residual stream.
    """

    gelu_epilogue: bool = False
    compile_norms: bool = False


def add_norm(x: torch.Tensor, delta: torch.Tensor, norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after `delta`, and its normalised form for the next sub-layer."""
    x = x + delta
    return x, F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class Mlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _activation(cfg.hidden_act)
        self.gelu_epilogue = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gelu_epilogue and x.dim() == 2:
            return self.fc2(torch._addmm_activation(self.fc1.bias, x, self.fc1.weight.t(), use_gelu=True))
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)
        # Layer scale (InternViT): per-channel factors on each sub-layer's output.
        self.ls1 = nn.Parameter(torch.ones(cfg.hidden_size)) if cfg.layer_scale else None
        self.ls2 = nn.Parameter(torch.ones(cfg.hidden_size)) if cfg.layer_scale else None

    def attend(self, h: torch.Tensor, backend: RaggedAttention, plan) -> torch.Tensor:
        delta = self.attn(h, backend, plan)
        return delta if self.ls1 is None else delta * self.ls1

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        delta = self.mlp(h)
        return delta if self.ls2 is None else delta * self.ls2

    def forward(self, x: torch.Tensor, backend: RaggedAttention, plan) -> torch.Tensor:
        x = x + self.attend(self.norm1(x), backend, plan)
        return x + self.feed_forward(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        # Stored in Conv2d layout [D, C, p, p] (checkpoint compatible), applied as a matmul.
        self.patch_embed = nn.Conv2d(cfg.num_channels, d, kernel_size=p, stride=p, bias=cfg.patch_bias)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.pos_embed_grid**2, d))
        self.prefix_tokens = nn.Parameter(torch.zeros(cfg.num_prefix_tokens, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.post_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if cfg.post_layernorm else nn.Identity()
        self._add_norm: Callable = add_norm
        self._positions: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}

    def use_kernels(self, options: KernelOptions) -> None:
        """Switch the inference fast paths on or off (see KernelOptions)."""
        if options.gelu_epilogue and self.cfg.hidden_act not in ("gelu", "gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"gelu_epilogue needs a GELU MLP, this model uses {self.cfg.hidden_act!r}")
        for block in self.blocks:
            block.mlp.gelu_epilogue = options.gelu_epilogue
        self._add_norm = torch.compile(add_norm, dynamic=True) if options.compile_norms else add_norm

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """position_embedding(grid), kept per grid while the table is unchanged (a video or a
        dynamic-resolution image would otherwise interpolate the table again every batch)."""
        version = self.pos_embed._version
        cached = self._positions.get(grid)
        if cached is None or cached[0] != version:
            if len(self._positions) >= 256:
                self._positions.clear()
            cached = self._positions[grid] = (version, self.position_embedding(grid))
        return cached[1]

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The trained square table fitted to a (gh, gw) patch grid: [gh*gw, D].

        "resample": bicubic to the grid. "cpe" (RADIO's cropped position embedding): bilinear to
        a max(gh, gw) square, then the top-left gh x gw window, so a wide and a tall image see
        the same positions along their long side.
        """
        n = self.cfg.pos_embed_grid
        if grid == (n, n):
            return self.pos_embed
        table = self.pos_embed.reshape(1, n, n, -1).permute(0, 3, 1, 2).float()
        if self.cfg.pos_embed_mode == "cpe":
            side = max(grid)
            table = F.interpolate(table, size=(side, side), mode="bilinear", align_corners=False)
            table = table[:, :, : grid[0], : grid[1]]
        else:
            table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
        return table.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)

    def run_blocks(self, x: torch.Tensor, backend: RaggedAttention, plan) -> torch.Tensor:
        """Every block, each residual add fused with the norm that follows it (Block.forward's math)."""
        blocks = list(self.blocks)
        h = blocks[0].norm1(x)
        for i, block in enumerate(blocks):
            x, h = self._add_norm(x, block.attend(h, backend, plan), block.norm2)
            delta = block.feed_forward(h)
            if i + 1 == len(blocks):
                return x + delta
            x, h = self._add_norm(x, delta, blocks[i + 1].norm1)
        return x

    def forward(self, batch: PackedTiles, backend: RaggedAttention | None = None) -> torch.Tensor:
        """Returns the patch tokens (prefix tokens dropped) of every tile, concatenated: [sum(gh*gw), D]."""
        backend = backend or TorchRaggedAttention()
        weight = self.patch_embed.weight.flatten(1)
        x = F.linear(batch.patches.to(weight.dtype), weight, self.patch_embed.bias)
        pos = {g: self.positions(g) for g in set(batch.grids)}
        x = x + torch.cat([pos[g] for g in batch.grids])

        n_prefix = self.cfg.num_prefix_tokens
        lengths = torch.tensor([gh * gw + n_prefix for gh, gw in batch.grids])
        indptr = F.pad(lengths.cumsum(0), (1, 0))
        if n_prefix:
            # Every sequence is [prefix tokens | its patches]. Index lists (built on the CPU,
            # copied without blocking) rather than boolean masks, which would sync the GPU.
            is_prefix = torch.zeros(int(indptr[-1]), dtype=torch.bool)
            for start in indptr[:-1].tolist():
                is_prefix[start : start + n_prefix] = True
            patch_rows = (~is_prefix).nonzero().squeeze(1).to(x.device, non_blocking=True)
            prefix_rows = is_prefix.nonzero().squeeze(1).to(x.device, non_blocking=True)
            full = x.new_empty(int(indptr[-1]), x.shape[1])
            full.index_copy_(0, patch_rows, x)
            full.index_copy_(0, prefix_rows, self.prefix_tokens.repeat(batch.num_tiles, 1))
            x = full

        plan = backend.plan(indptr, self.cfg.num_heads, self.cfg.head_dim)
        x = self.run_blocks(x, backend, plan)
        if n_prefix:
            x = x.index_select(0, patch_rows)
        return self.post_norm(x)
