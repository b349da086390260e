"""`auto`: pick the attention kernel per batch from the batch's shape.

No single kernel wins everywhere (bench/attention.py; figures in bench/RESULTS.md): cuDNN's
fused attention is fastest on long sequences, SDPA's flash kernel on one short sequence,
and one ragged call (FlashInfer, varlen) on batches of many lengths. A batch is put in
one of a few shape classes and the class's first available backend runs it. The classes'
thresholds and preferences are the crossovers the bench measured; the bench checks that
`auto` stays within 5% of the best single backend on every case it runs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from encoder_service.attention.torch_backend import sequence_bounds


@dataclass(frozen=True)
class AutoRule:
    long_from: int = 2048  # a sequence of at least this many tokens counts as long
    # Shape class -> backends in order of preference (the first one available runs it).
    prefer: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        "one-short": ("torch", "torch-varlen"),
        "one-long": ("torch-cudnn", "flashinfer", "torch"),
        "uniform-short": ("torch-cudnn", "flashinfer", "torch-varlen", "torch"),
        "uniform-long": ("torch-cudnn", "flashinfer", "torch"),
        "mixed": ("flashinfer", "torch-cudnn", "torch-varlen", "torch"),
    })


def shape_class(lengths: list[int], rule: AutoRule) -> str:
    """Which of the rule's classes a batch of these sequence lengths falls in."""
    lengths = [n for n in lengths if n > 0]
    distinct = set(lengths)
    if len(distinct) > 1:
        return "mixed"
    long = bool(lengths) and lengths[0] >= rule.long_from
    if len(lengths) <= 1:
        return "one-long" if long else "one-short"
    return "uniform-long" if long else "uniform-short"


@dataclass(frozen=True)
class AutoPlan:
    backend: Any
    plan: Any


class AutoAttention:
    name = "auto"

    def __init__(self, backends: dict[str, Any], rule: AutoRule | None = None):
        if not backends:
            raise ValueError("auto needs at least one available backend")
        self.backends, self.rule = backends, rule or AutoRule()
        self.choices: Counter[str] = Counter()  # backend name -> batches it ran (bench, metrics)

    def choose(self, lengths: list[int]) -> str:
        for name in self.rule.prefer[shape_class(lengths, self.rule)]:
            if name in self.backends:
                return name
        return next(iter(self.backends))

    def plan(self, indptr: torch.Tensor, num_heads: int = 0, head_dim: int = 0) -> AutoPlan:
        bounds = sequence_bounds(indptr)
        name = self.choose([b - a for a, b in zip(bounds[:-1], bounds[1:])])
        self.choices[name] += 1
        backend = self.backends[name]
        return AutoPlan(backend, backend.plan(indptr, num_heads, head_dim))

    def run(self, plan: AutoPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return plan.backend.run(plan.plan, q, k, v)

    def warmup(self, max_tokens: int, shortest: int, longest: int) -> int:
        return sum(b.warmup(max_tokens, shortest, longest) for b in self.backends.values() if hasattr(b, "warmup"))
