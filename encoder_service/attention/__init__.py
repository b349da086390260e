"""Ragged (packed, variable-length) non-causal attention.

Many images/tiles/frames of different lengths are packed into one
`[total_tokens, heads, head_dim]` batch; `indptr[i]:indptr[i+1]` are the rows
of sequence i, and no sequence attends to another. A backend plans once per
forward (the batch layout is the same in every layer) and runs once per layer.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from encoder_service.attention.torch_backend import TorchRaggedAttention


class RaggedAttention(Protocol):
    name: str

    def plan(self, indptr: torch.Tensor, num_heads: int, head_dim: int) -> Any:
        """Precompute what every layer of one forward reuses (indptr is int, CPU or device)."""

    def run(self, plan: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [total_tokens, heads, head_dim] -> output of the same shape."""


def get_backend(name: str = "auto", device: torch.device | str = "cpu") -> RaggedAttention:
    """The attention implementation for a device. 'auto' picks the best one available.

    Only the PyTorch backend exists so far; GPU kernels (FlashInfer ragged prefill,
    cuDNN for long sequences) plug in here behind the same plan/run seam.
    """
    if name in ("auto", "torch"):
        return TorchRaggedAttention()
    raise ValueError(f"unknown or unavailable attention backend {name!r} on {torch.device(device)}")


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indptr: torch.Tensor,
    backend: RaggedAttention | None = None,
) -> torch.Tensor:
    """One-shot ragged attention: plan + run (models plan once and call `run` per layer)."""
    backend = backend or TorchRaggedAttention()
    plan = backend.plan(indptr, q.shape[1], q.shape[2])
    return backend.run(plan, q, k, v)


__all__ = ["RaggedAttention", "TorchRaggedAttention", "attend", "get_backend"]
