"""Conversions between protobuf messages and Python objects; no pickle crosses the network.

Tensors travel as raw bytes + dtype + shape; schema-less extras as msgpack.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import numpy as np
import torch

from encoder_service.config import TilingSpec
from encoder_service.engine import EncodeOutput, ModelInfo
from encoder_service.errors import InvalidInput
from encoder_service.processor import MediaInput, Modality
from encoder_service.proto import encoder_pb2 as pb

_TORCH_TO_PB = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.uint8: pb.DTYPE_UINT8,
}
_PB_TO_TORCH = {v: k for k, v in _TORCH_TO_PB.items()}
_MODALITIES = {pb.MODALITY_IMAGE: Modality.IMAGE, pb.MODALITY_VIDEO: Modality.VIDEO}


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    t = t.detach().contiguous().cpu()
    # bf16 has no numpy dtype: ship the bytes as uint8 views, which is lossless for every dtype.
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(data=data, dtype=_TORCH_TO_PB[t.dtype], shape=list(t.shape))


def tensor_from_proto(msg: pb.Tensor) -> torch.Tensor:
    if msg.dtype not in _PB_TO_TORCH:
        raise InvalidInput(f"unknown tensor dtype {msg.dtype}")
    dtype, shape = _PB_TO_TORCH[msg.dtype], tuple(msg.shape)
    expected = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
    if any(s < 0 for s in shape) or len(msg.data) != expected:
        raise InvalidInput(f"tensor of shape {list(shape)} {dtype} needs {expected} bytes, got {len(msg.data)}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(dtype).reshape(shape)


# ------------------------------------------------------------------ media items


def media_to_proto(item: MediaInput) -> pb.MediaItem:
    msg = pb.MediaItem(item_id=item.item_id, content_hash=item.content_hash)
    msg.modality = pb.MODALITY_VIDEO if item.modality == Modality.VIDEO else pb.MODALITY_IMAGE
    if isinstance(item.data, np.ndarray):
        msg.raw_pixels.CopyFrom(tensor_to_proto(torch.from_numpy(np.ascontiguousarray(item.data))))
    elif isinstance(item.data, list):
        msg.encoded_frames.frames.extend(item.data)
    else:
        msg.encoded_image = bytes(item.data)
    return msg


def media_from_proto(msg: pb.MediaItem) -> MediaInput:
    name = msg.item_id or "<unnamed>"
    if msg.modality not in _MODALITIES:
        raise InvalidInput(f"item {name}: unknown modality {msg.modality}; expected IMAGE or VIDEO")
    modality = _MODALITIES[msg.modality]
    source = msg.WhichOneof("source")
    if source is None:
        raise InvalidInput(f"item {name}: no media data")
    if source == "raw_pixels":
        if msg.raw_pixels.dtype != pb.DTYPE_UINT8:
            raise InvalidInput(f"item {name}: raw pixels must be uint8")
        data = tensor_from_proto(msg.raw_pixels).numpy()
    elif source == "encoded_frames":
        if modality != Modality.VIDEO:
            raise InvalidInput(f"item {name}: encoded_frames is only for VIDEO items")
        data = list(msg.encoded_frames.frames)
    else:
        if modality != Modality.IMAGE:
            raise InvalidInput(f"item {name}: encoded_image is only for IMAGE items")
        data = msg.encoded_image
    return MediaInput(modality, data, item_id=msg.item_id, content_hash=msg.content_hash)


# ------------------------------------------------------------------ responses


def encode_response(request: pb.EncodeRequest, out: EncodeOutput) -> pb.EncodeResponse:
    items = [
        pb.ItemMetadata(
            item_id=src.item_id,
            content_hash=src.content_hash,
            token_count=n,
            offset=offset,
            num_tiles=tiles,
            tokens_per_frame=frames,
        )
        for src, n, offset, tiles, frames in zip(
            request.items, out.token_counts, out.offsets, out.num_tiles, out.tokens_per_frame
        )
    ]
    return pb.EncodeResponse(
        request_id=request.request_id,
        embeddings=tensor_to_proto(out.embeddings),
        items=items,
        extras=msgpack.packb(out.stats),
    )


@dataclass
class ItemEmbedding:
    item_id: str
    content_hash: str
    offset: int
    token_count: int
    num_tiles: int
    tokens_per_frame: list[int]


@dataclass
class EncodeResult:
    """Client-side view of an EncodeResponse: one tensor, split by counts on demand."""

    request_id: str
    embeddings: torch.Tensor  # [sum(token_count), hidden]
    items: list[ItemEmbedding]
    extras: dict

    @property
    def token_counts(self) -> list[int]:
        return [i.token_count for i in self.items]

    def split(self) -> list[torch.Tensor]:
        return [self.embeddings[i.offset : i.offset + i.token_count] for i in self.items]


def decode_response(msg: pb.EncodeResponse) -> EncodeResult:
    embeddings = tensor_from_proto(msg.embeddings)
    items = [
        ItemEmbedding(m.item_id, m.content_hash, m.offset, m.token_count, m.num_tiles, list(m.tokens_per_frame))
        for m in msg.items
    ]
    if sum(i.token_count for i in items) != embeddings.shape[0]:
        raise ValueError("response token counts do not add up to the embedding rows")
    return EncodeResult(msg.request_id, embeddings, items, msgpack.unpackb(msg.extras) if msg.extras else {})


def model_info_to_proto(info: ModelInfo) -> pb.ModelInfo:
    t = info.tiling
    return pb.ModelInfo(
        model_name=info.model_name,
        hidden_size=info.hidden_size,
        dtype=_TORCH_TO_PB[info.dtype],
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
    )


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
        dtype=_PB_TO_TORCH[msg.dtype],
        patch_size=msg.patch_size,
        tiling=tiling,
        max_tokens_per_batch=msg.max_tokens_per_batch,
        max_tokens_per_request=msg.max_tokens_per_request,
        max_items_per_request=msg.max_items_per_request,
        attention_backend=msg.attention_backend,
    )
