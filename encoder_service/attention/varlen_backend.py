"""PyTorch's variable-length flash attention: the whole ragged batch in ONE kernel call.

`torch.nn.attention.varlen.varlen_attn` reads cumulative sequence offsets, so a batch of many
short sequences (tiles, video frames) costs one launch instead of one per length group.
CUDA and fp16/bf16 only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from encoder_service.attention.torch_backend import sequence_bounds


@dataclass(frozen=True)
class VarlenPlan:
    total_tokens: int
    cu_seqlens: torch.Tensor  # int32 on the device, zero-length sequences dropped
    max_len: int


class VarlenAttention:
    name = "torch-varlen"

    def __init__(self, device: torch.device):
        from torch.nn.attention.varlen import varlen_attn  # absent from older torch builds

        self._varlen_attn = varlen_attn
        self.device = device

    def plan(self, indptr: torch.Tensor, num_heads: int = 0, head_dim: int = 0) -> VarlenPlan:
        bounds = sequence_bounds(indptr)
        kept = [bounds[0]] + [b for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        host = torch.tensor(kept, dtype=torch.int32).pin_memory()
        max_len = max((b - a for a, b in zip(kept[:-1], kept[1:])), default=0)
        return VarlenPlan(bounds[-1], host.to(self.device, non_blocking=True), max_len)

    def run(self, plan: VarlenPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != plan.total_tokens:
            raise ValueError(f"q has {q.shape[0]} rows, indptr covers {plan.total_tokens}")
        if plan.max_len == 0:
            return torch.empty_like(q)
        cu = plan.cu_seqlens
        return self._varlen_attn(q, k, v, cu, cu, plan.max_len, plan.max_len)
