"""What a served model is, as a consumer needs to know it: the geometry its token counts follow, its
limits, and its fingerprint (what produces the rows; `encoder_service.fingerprint` computes one from a
checkpoint directory). GetModelInfo carries all of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch

from encoder_service.contract.tokens import DynamicResolution, TilingSpec, VideoFrameGeometry


@dataclass(frozen=True)
class ModelFingerprint:
    weights: str
    processing: str
    hidden_size: int
    dtype: str  # "float32" | "bfloat16" | "float16"
    numerics: str = ""  # engine options that move rows by rounding only (part of `key`, not of the contract)

    @property
    def key(self) -> str:
        fields = (self.weights, self.processing, str(self.hidden_size), self.dtype, self.numerics)
        return "sha256:" + hashlib.sha256("\x1f".join(fields).encode()).hexdigest()

    @property
    def contract(self) -> str:
        """What a consumer checks: the weights, the preprocessing and the width (not dtype or numerics)."""
        fields = (self.weights, self.processing, str(self.hidden_size))
        return "sha256:" + hashlib.sha256("\x1f".join(fields).encode()).hexdigest()

    def mismatches(self, expected: "ModelFingerprint", check_dtype: bool = False) -> list[str]:
        """What differs from `expected` in a way that makes the rows wrong for its consumer."""
        out = []
        if self.weights != expected.weights:
            out.append(f"vision weights differ (pool {self.weights[:19]}…, expected {expected.weights[:19]}…)")
        if self.processing != expected.processing:
            out.append(f"preprocessing / token-count rules differ (pool {self.processing[:19]}…, "
                       f"expected {expected.processing[:19]}…)")
        if self.hidden_size != expected.hidden_size:
            out.append(f"row width {self.hidden_size}, expected {expected.hidden_size}")
        if check_dtype and self.dtype != expected.dtype:
            out.append(f"dtype {self.dtype}, expected {expected.dtype}")
        return out

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "contract": self.contract, "key": self.key}


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    hidden_size: int
    dtype: torch.dtype
    patch_size: int
    tiling: TilingSpec
    dynamic: DynamicResolution | None  # images as one variable-size sequence each, when set
    max_tokens_per_batch: int
    max_tokens_per_request: int
    max_items_per_request: int
    attention_backend: str
    video_pruning_rate: float = 0.0  # EVS rate for videos whose request does not set one
    default_video_frames: int = 16  # frames sampled from a video container when the request does not say
    fingerprint: ModelFingerprint | None = None  # what produces the rows
    video_frames: VideoFrameGeometry | None = None  # video frames resized to a patch budget, when set
    shared_cache: bool = False  # one cache for every caller: see protos/encoder.proto
    auth_required: bool = False  # calls need a bearer token
