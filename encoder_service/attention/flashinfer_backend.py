"""FlashInfer's ragged prefill (`BatchPrefillWithRaggedKVCacheWrapper`) on its cuDNN backend.

One call attends every sequence of a mixed batch (short tiles next to 8k-token images).
Only the cuDNN backend is used: FlashInfer's fa2 faults at head_dim 80 and fa3 does not
build for it (../shared/notes/flashinfer-vit.md). cuDNN builds one execution graph per
(batch size, declared max lengths) and keeps it in a process-wide cache, so both are
rounded up to powers of two here (the batch padded with zero-length sequences, the real
lengths still come from the indptrs): a server meets a few dozen shapes, not thousands,
and `warmup` builds the common ones at start-up instead of mid-request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from encoder_service.attention.torch_backend import sequence_bounds

WORKSPACE_BYTES = 128 << 20
MIN_DECLARED_LEN = 256


def bucket(n: int, floor: int = 1) -> int:
    """Smallest power of two >= max(n, floor)."""
    return 1 << (max(n, floor) - 1).bit_length()


@dataclass(frozen=True)
class FlashInferPlan:
    total_tokens: int
    wrapper: object  # the planned wrapper; run() uses its latest plan


class FlashInferAttention:
    name = "flashinfer"

    def __init__(self, device: torch.device, num_heads: int, head_dim: int, dtype: torch.dtype):
        import flashinfer  # the optional `gpu` extra

        if head_dim % 8 or head_dim > 256:
            raise ValueError(f"FlashInfer's cuDNN backend needs head_dim a multiple of 8 up to 256, got {head_dim}")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"FlashInfer's cuDNN backend runs bf16/fp16, not {dtype}")
        self.device, self.num_heads, self.head_dim, self.dtype = device, num_heads, head_dim, dtype
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # One wrapper: the engine runs one forward at a time on one stream, so a re-plan for
        # the next batch is stream-ordered after the previous batch's kernels.
        self._wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend="cudnn")

    def plan(self, indptr: torch.Tensor, num_heads: int = 0, head_dim: int = 0) -> FlashInferPlan:
        bounds = sequence_bounds(indptr)
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        padded = bounds + [bounds[-1]] * (bucket(len(lengths)) - len(lengths))
        declared = bucket(max(lengths, default=1), MIN_DECLARED_LEN)
        host = torch.tensor(padded, dtype=torch.int32).pin_memory()  # host indptrs: no sync in plan()
        self._wrapper.plan(
            host, host, self.num_heads, self.num_heads, self.head_dim,
            causal=False, q_data_type=self.dtype,
            max_token_per_sequence=declared, max_sequence_kv=declared,
        )
        return FlashInferPlan(bounds[-1], self._wrapper)

    def run(self, plan: FlashInferPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != plan.total_tokens:
            raise ValueError(f"q has {q.shape[0]} rows, indptr covers {plan.total_tokens}")
        if plan.wrapper is not self._wrapper:
            raise ValueError("plan belongs to another backend")
        return self._wrapper.run(q.contiguous(), k.contiguous(), v.contiguous())

    def warmup(self, max_tokens: int, shortest: int, longest: int) -> int:
        """Build, now, the cuDNN graph of every (batch bucket, length bucket) that a batch of at
        most `max_tokens` tokens, sequences `shortest`..`longest` long, can need. Returns how many."""
        built, length = 0, bucket(shortest, MIN_DECLARED_LEN)
        while length <= bucket(longest, MIN_DECLARED_LEN):
            longest_here, batch = min(length, longest), 1
            while longest_here + (batch // 2) * shortest <= max_tokens:
                self._warm([longest_here] + [shortest] * (batch // 2))  # batch//2 + 1 sequences: this bucket
                built += 1
                batch *= 2
            length *= 2
        return built

    def _warm(self, lengths: list[int]) -> None:
        indptr = torch.tensor([0] + lengths).cumsum(0)
        q = torch.zeros(sum(lengths), self.num_heads, self.head_dim, dtype=self.dtype, device=self.device)
        self.run(self.plan(indptr), q, q, q)
