"""ModelInfo and ModelFingerprint <-> their messages (GetModelInfo)."""

from __future__ import annotations

import dataclasses

from encoder_service.contract.model_info import ModelFingerprint, ModelInfo
from encoder_service.contract.result import dtype_from_name, dtype_name
from encoder_service.contract.tokens import DynamicResolution, TilingSpec, VideoFrameGeometry
from encoder_service.contract.wire.tensors import PB_TO_TORCH, TORCH_TO_PB
from encoder_service.proto import encoder_pb2 as pb


def model_info_to_proto(info: ModelInfo) -> pb.ModelInfo:
    t = info.tiling
    return pb.ModelInfo(
        model_name=info.model_name,
        hidden_size=info.hidden_size,
        dtype=TORCH_TO_PB[info.dtype],
        patch_size=info.patch_size,
        tile_size=t.tile_size,
        tokens_per_tile=t.tokens_per_tile,
        max_tiles=t.max_tiles,
        min_tiles=t.min_tiles,
        use_thumbnail=t.use_thumbnail,
        max_tokens_per_batch=info.max_tokens_per_batch,
        max_tokens_per_request=info.max_tokens_per_request,
        max_items_per_request=info.max_items_per_request,
        attention_backend=info.attention_backend,
        dynamic_resolution=None if info.dynamic is None else pb.DynamicResolution(**dataclasses.asdict(info.dynamic)),
        video_pruning_rate=info.video_pruning_rate,
        default_video_frames=info.default_video_frames,
        fingerprint=None if info.fingerprint is None else fingerprint_to_proto(info.fingerprint),
        video_frame_geometry=None if info.video_frames is None
        else pb.VideoFrameGeometry(**dataclasses.asdict(info.video_frames)),
        shared_cache=info.shared_cache,
        auth_required=info.auth_required,
    )


def fingerprint_to_proto(f: ModelFingerprint) -> pb.ModelFingerprint:
    return pb.ModelFingerprint(weights=f.weights, processing=f.processing, hidden_size=f.hidden_size,
                               dtype=TORCH_TO_PB[dtype_from_name(f.dtype)], numerics=f.numerics, key=f.key)


def fingerprint_from_proto(msg: pb.ModelFingerprint) -> ModelFingerprint:
    return ModelFingerprint(msg.weights, msg.processing, msg.hidden_size, dtype_name(PB_TO_TORCH[msg.dtype]),
                            msg.numerics)


def model_info_from_proto(msg: pb.ModelInfo) -> ModelInfo:
    tiling = TilingSpec(
        tile_size=msg.tile_size,
        min_tiles=msg.min_tiles,
        max_tiles=msg.max_tiles,
        use_thumbnail=msg.use_thumbnail,
        tokens_per_tile=msg.tokens_per_tile,
    )
    return ModelInfo(
        model_name=msg.model_name,
        hidden_size=msg.hidden_size,
        dtype=PB_TO_TORCH[msg.dtype],
        patch_size=msg.patch_size,
        tiling=tiling,
        dynamic=_spec(DynamicResolution, msg, "dynamic_resolution"),
        max_tokens_per_batch=msg.max_tokens_per_batch,
        max_tokens_per_request=msg.max_tokens_per_request,
        max_items_per_request=msg.max_items_per_request,
        attention_backend=msg.attention_backend,
        video_pruning_rate=msg.video_pruning_rate,
        default_video_frames=msg.default_video_frames,
        fingerprint=fingerprint_from_proto(msg.fingerprint) if msg.HasField("fingerprint") else None,
        video_frames=_spec(VideoFrameGeometry, msg, "video_frame_geometry"),
        shared_cache=msg.shared_cache,
        auth_required=msg.auth_required,
    )


def with_access(info_bytes: bytes, shared_cache: bool, auth_required: bool) -> bytes:
    """A serialised ModelInfo with the door's access settings filled in (the model process does not know them)."""
    msg = pb.ModelInfo.FromString(info_bytes)
    msg.shared_cache, msg.auth_required = shared_cache, auth_required
    return msg.SerializeToString()


def _spec(cls, msg, field: str):
    """A config dataclass from the ModelInfo sub-message of the same fields, or None when it is unset."""
    if not msg.HasField(field):
        return None
    sub = getattr(msg, field)
    return cls(**{f.name: getattr(sub, f.name) for f in dataclasses.fields(cls)})
