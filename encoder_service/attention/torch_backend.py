"""PyTorch ragged attention: sequences of equal length share one batched SDPA call.

Tiles of one model all have the same length, so a ragged batch is usually one
or a few length groups; grouping keeps memory at O(group * L^2) per group (and
O(L) with fused SDPA kernels) instead of a dense block-diagonal mask over all
tokens, and it never lets one sequence see another.

Two registered names share this code: "torch" lets SDPA pick its kernel (cuDNN for some
shapes, flash for others on recent GPUs; math/efficient on the CPU); "torch-cudnn" makes cuDNN's fused attention SDPA's first choice, with flash for the
shapes cuDNN declines (very short sequences), so no batch shape can fail mid-request.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(frozen=True)
class LengthGroup:
    length: int
    # Row index of every token of the group, shape [num_seqs, length].
    rows: torch.Tensor
    # When the group's sequences are adjacent in the packed batch: their first row.
    contiguous_start: int | None


@dataclass(frozen=True)
class TorchPlan:
    total_tokens: int
    groups: list[LengthGroup]


def sequence_bounds(indptr: torch.Tensor) -> list[int]:
    """indptr as a checked Python list: starts at 0, never decreases."""
    bounds = [int(x) for x in indptr.tolist()]
    if not bounds or bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError("indptr must start at 0 and be non-decreasing")
    return bounds


class TorchRaggedAttention:
    name = "torch"
    kernels: list[SDPBackend] | None = None  # SDPA's kernels in order of priority; None: SDPA chooses

    def plan(self, indptr: torch.Tensor, num_heads: int = 0, head_dim: int = 0) -> TorchPlan:
        bounds = sequence_bounds(indptr)
        starts_by_length: dict[int, list[int]] = {}
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                starts_by_length.setdefault(end - start, []).append(start)
        groups = []
        for length, starts in starts_by_length.items():
            contiguous = all(b - a == length for a, b in zip(starts[:-1], starts[1:]))
            rows = torch.tensor(starts)[:, None] + torch.arange(length)[None, :]
            groups.append(LengthGroup(length, rows, starts[0] if contiguous else None))
        return TorchPlan(bounds[-1], groups)

    def run(self, plan: TorchPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != plan.total_tokens:
            raise ValueError(f"q has {q.shape[0]} rows, indptr covers {plan.total_tokens}")
        with sdpa_kernel(self.kernels, set_priority=True) if self.kernels else contextlib.nullcontext():
            if len(plan.groups) == 1 and plan.groups[0].contiguous_start == 0:  # one length (tiles): no scatter
                g = plan.groups[0]
                n = g.rows.shape[0]
                return self._sdpa(*(t.view(n, g.length, *t.shape[1:]) for t in (q, k, v))).reshape(q.shape)
            out = torch.empty_like(q)
            for g in plan.groups:
                n = g.rows.shape[0]
                if g.contiguous_start is not None:
                    span = slice(g.contiguous_start, g.contiguous_start + n * g.length)
                    qs, ks, vs = (t[span].view(n, g.length, *t.shape[1:]) for t in (q, k, v))
                else:
                    rows = g.rows.to(q.device)
                    qs, ks, vs = (t[rows] for t in (q, k, v))
                o = self._sdpa(qs, ks, vs).reshape(n * g.length, *q.shape[1:])
                if g.contiguous_start is not None:
                    out[span] = o
                else:
                    out[rows.reshape(-1)] = o
            return out

    @staticmethod
    def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[n, L, H, D] each -> [n, L, H, D]; SDPA wants [n, H, L, D]. Non-causal, no mask."""
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class CudnnSdpaAttention(TorchRaggedAttention):
    """Length groups through SDPA's cuDNN kernel first (CUDA only; refused at start-up elsewhere)."""

    name = "torch-cudnn"
    kernels = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
