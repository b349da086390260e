"""Ragged (packed, variable-length) non-causal attention.

Many images/tiles/frames of different lengths are packed into one
`[total_tokens, heads, head_dim]` batch; `indptr[i]:indptr[i+1]` are the rows
of sequence i, and no sequence attends to another. A backend plans once per
forward (the batch layout is the same in every layer) and runs once per layer.

Backends: "torch" (SDPA per length group, any device), "torch-cudnn" (the same through
cuDNN's fused kernel), "torch-varlen" (one flash call per batch), "flashinfer" (FlashInfer's
ragged prefill on cuDNN; `pip install -e '.[gpu]'`) and "auto" (per batch, by shape). A
backend that cannot run on the engine's device/dtype/head_dim is refused when the engine
starts, with the reason, after a test call on a small ragged batch: never mid-request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F

from encoder_service.attention.auto import AutoAttention, AutoRule, shape_class
from encoder_service.attention.torch_backend import CudnnSdpaAttention, TorchRaggedAttention


class RaggedAttention(Protocol):
    name: str

    def plan(self, indptr: torch.Tensor, num_heads: int, head_dim: int) -> Any:
        """Precompute what every layer of one forward reuses (indptr is int, on the host)."""

    def run(self, plan: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: [total_tokens, heads, head_dim] -> output of the same shape."""


class AttentionUnavailable(ValueError):
    """A backend that cannot run here; the message says why."""


@dataclass(frozen=True)
class AttentionSpec:
    """What a backend must handle: the engine's device, dtype and attention geometry."""

    device: torch.device
    num_heads: int
    head_dim: int
    dtype: torch.dtype


def _cuda_only(spec: AttentionSpec, name: str) -> None:
    if spec.device.type != "cuda":
        raise AttentionUnavailable(f"attention backend {name!r} needs a CUDA device, the engine runs on {spec.device}")


def _torch(spec: AttentionSpec) -> RaggedAttention:
    return TorchRaggedAttention()


def _torch_cudnn(spec: AttentionSpec) -> RaggedAttention:
    _cuda_only(spec, "torch-cudnn")
    return CudnnSdpaAttention()


def _torch_varlen(spec: AttentionSpec) -> RaggedAttention:
    _cuda_only(spec, "torch-varlen")
    from encoder_service.attention.varlen_backend import VarlenAttention

    return VarlenAttention(spec.device)


def _flashinfer(spec: AttentionSpec) -> RaggedAttention:
    _cuda_only(spec, "flashinfer")
    from encoder_service.attention.flashinfer_backend import FlashInferAttention

    return FlashInferAttention(spec.device, spec.num_heads, spec.head_dim, spec.dtype)


BACKENDS: dict[str, Callable[[AttentionSpec], RaggedAttention]] = {
    "torch": _torch,
    "torch-cudnn": _torch_cudnn,
    "torch-varlen": _torch_varlen,
    "flashinfer": _flashinfer,
}


def _checked(name: str, spec: AttentionSpec) -> RaggedAttention:
    """Build a backend and prove it on a small ragged batch against the fp32 reference."""
    try:
        backend = BACKENDS[name](spec)
        lengths = [1, 7, 33]
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(sum(lengths), spec.num_heads, spec.head_dim, generator=gen) for _ in range(3))
        indptr = F.pad(torch.tensor(lengths).cumsum(0), (1, 0))
        got = backend.run(backend.plan(indptr, spec.num_heads, spec.head_dim),
                          *(t.to(spec.device, spec.dtype) for t in (q, k, v))).float().cpu()
    except AttentionUnavailable:
        raise
    except (ImportError, RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if isinstance(e, ImportError):
            reason += " (install the GPU extra: pip install -e '.[gpu]')" if name == "flashinfer" else ""
        raise AttentionUnavailable(
            f"attention backend {name!r} cannot run on {spec.device} ({str(spec.dtype).removeprefix('torch.')}, "
            f"{spec.num_heads} heads x {spec.head_dim}): {reason}"
        ) from e
    want = reference_attention(q, k, v, lengths)
    err = ((got - want).norm() / want.norm()).item()
    if not err < 2e-2:
        raise AttentionUnavailable(f"attention backend {name!r} gives wrong results on {spec.device} "
                                   f"(relative error {err:.3g} on a test batch); not used")
    return backend


def available_backends(spec: AttentionSpec) -> dict[str, RaggedAttention | str]:
    """Every registered backend: the working instance, or the reason it cannot run here."""
    out: dict[str, RaggedAttention | str] = {}
    for name in BACKENDS:
        try:
            out[name] = _checked(name, spec)
        except AttentionUnavailable as e:
            out[name] = str(e)
    return out


def get_backend(name: str = "auto", spec: AttentionSpec | None = None, rule: AutoRule | None = None) -> RaggedAttention:
    """The attention implementation `name` for `spec` (default: CPU fp32, any geometry).

    Raises AttentionUnavailable, with the reason, for a backend that cannot run there.
    "auto" uses every backend that can.
    """
    spec = spec or AttentionSpec(torch.device("cpu"), 1, 8, torch.float32)
    if name == "auto":
        if spec.device.type != "cuda":
            return AutoAttention({"torch": TorchRaggedAttention()}, rule)
        working = {n: b for n, b in available_backends(spec).items() if not isinstance(b, str)}
        return AutoAttention(working, rule)
    if name not in BACKENDS:
        raise AttentionUnavailable(f"unknown attention backend {name!r}; choose auto, {', '.join(BACKENDS)}")
    return _checked(name, spec)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Per-sequence SDPA in fp32 (math kernel): what every backend is checked against."""
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start : start + n].float().transpose(0, 1) for t in (q, k, v))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1))
        start += n
    return torch.cat(out) if out else q.float()


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


__all__ = [
    "BACKENDS", "AttentionSpec", "AttentionUnavailable", "AutoAttention", "AutoRule", "RaggedAttention",
    "TorchRaggedAttention", "attend", "available_backends", "get_backend", "reference_attention", "shape_class",
]
