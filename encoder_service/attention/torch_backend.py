"""PyTorch ragged attention: sequences of equal length share one batched SDPA call.

Tiles of one model all have the same length, so a ragged batch is usually one
or a few length groups; grouping keeps memory at O(group * L^2) per group (and
O(L) with fused SDPA kernels) instead of a dense block-diagonal mask over all
tokens, and it never lets one sequence see another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


class TorchRaggedAttention:
    name = "torch"

    def plan(self, indptr: torch.Tensor, num_heads: int, head_dim: int) -> TorchPlan:
        bounds = [int(x) for x in indptr.tolist()]
        if any(b > a for a, b in zip(bounds[1:], bounds[:-1])) or (bounds and bounds[0] != 0):
            raise ValueError("indptr must start at 0 and be non-decreasing")
        starts_by_length: dict[int, list[int]] = {}
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                starts_by_length.setdefault(end - start, []).append(start)
        groups = []
        for length, starts in starts_by_length.items():
            contiguous = all(b - a == length for a, b in zip(starts[:-1], starts[1:]))
            rows = torch.tensor(starts)[:, None] + torch.arange(length)[None, :]
            groups.append(LengthGroup(length, rows, starts[0] if contiguous else None))
        return TorchPlan(bounds[-1] if bounds else 0, groups)

    def run(self, plan: TorchPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != plan.total_tokens:
            raise ValueError(f"q has {q.shape[0]} rows, indptr covers {plan.total_tokens}")
        out = torch.empty_like(q)
        for g in plan.groups:
            n = g.rows.shape[0]
            if g.contiguous_start is not None:
                span = slice(g.contiguous_start, g.contiguous_start + n * g.length)
                qs, ks, vs = (t[span].view(n, g.length, *t.shape[1:]) for t in (q, k, v))
            else:
                rows = g.rows.to(q.device)
                qs, ks, vs = (t[rows] for t in (q, k, v))
            # [n, L, H, D] -> [n, H, L, D] for SDPA, non-causal, no mask.
            o = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2))
            o = o.transpose(1, 2)
            if g.contiguous_start is not None:
                out[span] = o.reshape(n * g.length, *q.shape[1:])
            else:
                out[rows.reshape(-1)] = o.reshape(n * g.length, *q.shape[1:])
        return out
