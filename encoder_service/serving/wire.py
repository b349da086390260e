"""Conversions between protobuf messages and Python objects; no pickle crosses the network.

Tensors travel as raw bytes + dtype + shape; schema-less extras as msgpack.

The embedding tensor is nearly all of an EncodeResponse (31 MB for two images at LLM width
5120 in bf16), so its path is kept to the copies that cannot be avoided:
- server: the model process serialises everything else with the generated code
  (`response_header`); the transport's `response_bytes` frames the tensor field by hand around
  ONE copy of the tensor's bytes, made without the GIL;
- client: `decode_response` reads the serialised bytes in place: the tensor is a view of
  the received message (plus one GIL-free copy if the caller wants a tensor of its own).
The bytes are ordinary protobuf (field order is free in the wire format): any client
generated from `protos/encoder.proto` parses them, and `tests/test_wire.py` checks the
result equals the generated code's own serialisation.
"""

from __future__ import annotations

import ctypes
import math
import warnings
import dataclasses
from dataclasses import dataclass

import grpc
import msgpack
import numpy as np
import torch
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from encoder_service.config import DynamicResolution, TilingSpec, VideoFrameGeometry
from encoder_service.digest import MediaDigest
from encoder_service.engine import EncodeOutput, ModelInfo, running_offsets
from encoder_service.errors import (
    BudgetExceeded,
    CacheMiss,
    DeadlineExceeded,
    EncodeFailed,
    InvalidInput,
    ItemError,
    Unavailable,
    clean_message,
)
from encoder_service.processor import MediaInput, Modality
from encoder_service.video.decode import SampledFrames, VideoSampling
from encoder_service.fingerprint import ModelFingerprint
from encoder_service.proto import encoder_pb2 as pb

# Views of received bytes are read-only by contract (see EncodeResult); torch warns on every one.
warnings.filterwarnings("ignore", message="The given (buffer|NumPy array) is not writable", category=UserWarning)

_TORCH_TO_PB = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.uint8: pb.DTYPE_UINT8,
}
_PB_TO_TORCH = {v: k for k, v in _TORCH_TO_PB.items()}
_MODALITIES = {pb.MODALITY_IMAGE: Modality.IMAGE, pb.MODALITY_VIDEO: Modality.VIDEO}

# A 13-tile image of a 4096-wide LLM in bf16 is ~27 MB: far past gRPC's 4 MB default.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                    max_receive_bytes: int | None = None) -> list[tuple[str, int]]:
    """gRPC settings for messages of tens of MB, on both server and client: raised size limits
    (a server receives less than it sends: `max_receive_bytes`), HTTP/2 frames up to 16 MB and a
    64 MB read-ahead, so a response is not trickled through the 16 KB frame / 64 KB window defaults.
    Clients reconnect within a few seconds of a server coming back (gRPC's default backoff grows to
    two minutes: a pool replica restarting on its address would stay unreachable that long)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_receive_bytes or max_message_bytes),
        ("grpc.http2.max_frame_size", (1 << 24) - 1),
        ("grpc.http2.lookahead_bytes", 64 << 20),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]


def status_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC status an Encode failure maps to (the same on every transport)."""
    if isinstance(error, EncodeFailed):  # already mapped, in the model process
        return grpc.StatusCode[error.code]
    if isinstance(error, CacheMiss):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, BudgetExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(error, Unavailable):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def status_message(error: BaseException) -> str:
    """The status details for a failure (`status_for`): the caller's errors say what was wrong
    (no reprs, no server paths); internal ones say only that, the traceback stays in the log."""
    if isinstance(error, EncodeFailed):
        return error.message
    if status_for(error) == grpc.StatusCode.INTERNAL:
        return "internal error in the encoder (logged on the server)"
    return clean_message(str(error))


def failing_item(error: BaseException) -> tuple[int, str] | None:
    """(index, item_id) of the item a failure belongs to, if one item caused it."""
    index = getattr(error, "item_index", None)
    return None if index is None else (index, getattr(error, "item_id", ""))


STATUS_DETAILS_KEY = "grpc-status-details-bin"  # the standard rich-error trailer (google.rpc.Status)


def missing_items(error: BaseException) -> list[tuple[int, str]]:
    """(index, item_id) of the items a CACHE_MISS asks the caller to send with their media."""
    return list(getattr(error, "missing", None) or [])


def status_trailers(error: BaseException) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata for a failure: a google.rpc.Status whose details hold a BadRequest field
    violation on `items[i]` for each item it concerns and an ErrorInfo (reason BAD_ITEM, or CACHE_MISS
    with `missing_items`), so any gRPC client library can read it."""
    item = failing_item(error)
    if item is None:
        return ()
    index, item_id = item
    missing = missing_items(error)
    named = missing or [item]
    details = any_pb2.Any()
    details.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(
            field=f"items[{i}]", description="sent by digest, not cached here" if missing else status_message(error))
        for i, _ in named]))
    metadata = {"item_index": str(index), "item_id": item_id}
    if missing:
        metadata["missing_items"] = ",".join(str(i) for i, _ in missing)
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="CACHE_MISS" if missing else "BAD_ITEM", domain="encoder_service",
                                          metadata=metadata))
    status = status_pb2.Status(code=status_for(error).value[0], message=status_message(error), details=[details, info])
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def _error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    return None


def item_from_status(error: grpc.RpcError) -> tuple[int, str] | None:
    """Client side: (index, item_id) of the failing item, from the status details, if any."""
    info = _error_info(error)
    if info is None or "item_index" not in info.metadata:
        return None
    return int(info.metadata["item_index"]), info.metadata.get("item_id", "")


def cache_misses_from_status(error: grpc.RpcError) -> list[int] | None:
    """Client side: indices of the items to send again with their media, if this is a CACHE_MISS."""
    if error.code() != grpc.StatusCode.NOT_FOUND:
        return None
    info = _error_info(error)
    if info is None or info.reason != "CACHE_MISS":
        return None
    return [int(i) for i in info.metadata.get("missing_items", "").split(",") if i]


def element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    t = t.detach().contiguous().cpu()
    # bf16 has no numpy dtype: ship the bytes as uint8 views, which is lossless for every dtype.
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(data=data, dtype=_TORCH_TO_PB[t.dtype], shape=list(t.shape))


def _tensor_from_buffer(data, dtype_code: int, shape: tuple[int, ...], copy: bool) -> torch.Tensor:
    """A tensor over `data` (bytes-like), checked against dtype and shape."""
    if dtype_code not in _PB_TO_TORCH:
        raise InvalidInput(f"unknown tensor dtype {dtype_code}")
    dtype = _PB_TO_TORCH[dtype_code]
    if any(s < 0 for s in shape):
        raise InvalidInput(f"negative dimension in tensor shape {list(shape)}")
    expected = math.prod(shape) * element_size(dtype)  # Python ints: no overflow for any int64 dims
    if len(data) != expected:
        raise InvalidInput(f"tensor of shape {list(shape)} {dtype} needs {expected} bytes, got {len(data)}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    view = torch.frombuffer(data, dtype=torch.uint8)
    return (view.clone() if copy else view).view(dtype).reshape(shape)


def tensor_from_proto(msg: pb.Tensor) -> torch.Tensor:
    return _tensor_from_buffer(msg.data, msg.dtype, tuple(msg.shape), copy=True)


# ------------------------------------------------------------------ media items


def media_to_proto(item: MediaInput) -> pb.MediaItem:
    msg = pb.MediaItem(item_id=item.item_id, content_hash=item.content_hash)
    msg.modality = pb.MODALITY_VIDEO if item.modality == Modality.VIDEO else pb.MODALITY_IMAGE
    if isinstance(item.data, MediaDigest):
        msg.digest.sha256 = item.data.value
    elif isinstance(item.data, np.ndarray):
        msg.raw_pixels.CopyFrom(tensor_to_proto(torch.from_numpy(np.ascontiguousarray(item.data))))
    elif isinstance(item.data, list):
        msg.encoded_frames.frames.extend(item.data)
    elif item.modality == Modality.VIDEO:
        msg.encoded_video = bytes(item.data)
    else:
        msg.encoded_image = bytes(item.data)
    if item.sampling is not None:
        msg.sampling.CopyFrom(pb.VideoSampling(**dataclasses.asdict(item.sampling)))
    if item.pruning_rate is not None:
        msg.pruning_rate = item.pruning_rate
    return msg


def media_items_from_proto(request: pb.EncodeRequest) -> list[MediaInput]:
    """The request's items; an error names the item (index and item_id) it came from."""
    items = []
    for i, msg in enumerate(request.items):
        try:
            items.append(media_from_proto(msg))
        except ItemError as e:
            raise e.for_item(i, msg.item_id) from None
    return items


def media_from_proto(msg: pb.MediaItem) -> MediaInput:
    if msg.modality not in _MODALITIES:
        raise InvalidInput(f"unknown modality {msg.modality}; expected IMAGE or VIDEO")
    modality = _MODALITIES[msg.modality]
    source = msg.WhichOneof("source")
    if source is None:
        raise InvalidInput("no media data")
    if source == "raw_pixels":
        if msg.raw_pixels.dtype != pb.DTYPE_UINT8:
            raise InvalidInput("raw pixels must be uint8")
        data = tensor_from_proto(msg.raw_pixels).numpy()  # shape and byte count checked first
    elif source == "encoded_frames":
        if modality != Modality.VIDEO:
            raise InvalidInput("encoded_frames is only for VIDEO items")
        data = list(msg.encoded_frames.frames)
    elif source == "encoded_video":
        if modality != Modality.VIDEO:
            raise InvalidInput("encoded_video is only for VIDEO items")
        data = msg.encoded_video
    elif source == "digest":
        data = MediaDigest(msg.digest.sha256)
    else:
        if modality != Modality.IMAGE:
            raise InvalidInput("encoded_image is only for IMAGE items")
        data = msg.encoded_image
    sampling = None
    if msg.HasField("sampling"):
        if source not in ("encoded_video", "digest") or modality != Modality.VIDEO:
            raise InvalidInput("sampling applies to encoded_video only")
        sampling = VideoSampling(msg.sampling.num_frames, msg.sampling.fps, msg.sampling.max_frames)
    rate = msg.pruning_rate if msg.HasField("pruning_rate") else None
    if rate is not None and modality != Modality.VIDEO:
        raise InvalidInput("pruning_rate applies to VIDEO items only")
    return MediaInput(modality, data, item_id=msg.item_id, content_hash=msg.content_hash,
                      sampling=sampling, pruning_rate=rate)


# ------------------------------------------------------------------ responses: server side


def response_header(request: pb.EncodeRequest, out, extras: dict | None = None) -> pb.EncodeResponse:
    """Everything of the response but the tensor's bytes (its dtype and shape included). `out`: an
    EncodeOutput, or the pipeline's Encoding (the same per-item fields, rows left where they are)."""
    count = len(out.token_counts)
    items = [
        item_metadata(src, n, offset, tiles, frames, video, digest, hit)
        for src, n, offset, tiles, frames, video, digest, hit in zip(
            request.items, out.token_counts, out.offsets, out.num_tiles, out.tokens_per_frame,
            out.video_frames or [None] * count, out.digests or [""] * count, out.cache_hits or [False] * count,
        )
    ]
    return pb.EncodeResponse(
        request_id=request.request_id,
        embeddings=pb.Tensor(dtype=_TORCH_TO_PB[out.dtype], shape=list(out.shape)),
        items=items,
        extras=msgpack.packb(extras if extras is not None else out.stats),
    )


def item_metadata(src: pb.MediaItem, rows: int, offset: int, num_tiles: int, tokens_per_frame: list[int],
                  video: SampledFrames | None, digest: str, cache_hit: bool) -> pb.ItemMetadata:
    """What a response says about one item (`src`: the request's item) whose rows start at `offset`."""
    return pb.ItemMetadata(
        item_id=src.item_id,
        content_hash=src.content_hash,
        token_count=rows,
        offset=offset,
        num_tiles=num_tiles,
        tokens_per_frame=tokens_per_frame,
        frame_timestamps=video.times if video else (),
        frame_indices=video.indices if video else (),
        video_fps=video.fps if video else 0.0,
        digest=digest,
        cache_hit=cache_hit,
    )


def encode_response(request: pb.EncodeRequest, out: EncodeOutput, extras: dict | None = None) -> pb.EncodeResponse:
    """The response as a generated message (the reference the fast path is tested against)."""
    msg = response_header(request, out, extras)
    msg.embeddings.data = tensor_to_proto(out.embeddings).data
    return msg


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


_LEN = 2  # protobuf wire type of bytes and messages
_EMBEDDINGS_TAG = _varint(2 << 3 | _LEN)  # EncodeResponse.embeddings
_DATA_TAG = _varint(1 << 3 | _LEN)  # Tensor.data


def response_bytes(header: pb.EncodeResponse, segments: list[torch.Tensor]) -> bytes:
    """A header (`response_header`, consumed) and the tensor's bytes (flat uint8 segments, in order: each
    item's rows where they live) as one serialised EncodeResponse, copied once without the GIL."""
    size = sum(s.numel() for s in segments)
    tensor_meta = header.embeddings.SerializeToString()
    header.ClearField("embeddings")
    data_field = _DATA_TAG + _varint(size)
    embeddings_len = len(tensor_meta) + len(data_field) + size
    prefix = header.SerializeToString() + _EMBEDDINGS_TAG + _varint(embeddings_len) + tensor_meta + data_field
    return bytes_of(prefix, segments)


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]


def bytes_of(prefix: bytes, segments: list[torch.Tensor]) -> bytes:
    """`prefix + the segments` as one new `bytes` object, the tensor bytes copied with the GIL released.

    gRPC's Python layer sends only `bytes`, and every CPython way of building a large `bytes`
    from a buffer (join, concatenation, bytes(memoryview)) copies while holding the GIL: 5-35 ms
    per response during which the model thread cannot launch kernels. So the object is
    allocated uninitialised (`PyBytes_FromStringAndSize(NULL, n)`, the C API's way to build a
    bytes object in place; `bytes(n)` would zero it, also under the GIL) and filled by torch,
    which releases the GIL. The object is new and unshared (and never hashed) until it is
    filled, so nothing can observe it change.
    """
    size = sum(s.numel() for s in segments)
    if not size:
        return bytes(prefix)
    buf = _new_bytes(None, len(prefix) + size)
    view = torch.frombuffer(buf, dtype=torch.uint8)
    if prefix:
        view[: len(prefix)].copy_(torch.frombuffer(prefix, dtype=torch.uint8))
    pos = len(prefix)
    for segment in segments:
        view[pos : pos + segment.numel()].copy_(segment)
        pos += segment.numel()
    return buf


# ------------------------------------------------------------------ responses: client side


@dataclass
class ItemEmbedding:
    item_id: str
    content_hash: str
    offset: int
    token_count: int
    num_tiles: int
    tokens_per_frame: list[int]
    frame_timestamps: list[float] = dataclasses.field(default_factory=list)
    digest: str = ""  # the media digest the server computed (send it instead of the bytes next time)
    cache_hit: bool = False
    frame_indices: list[int] = dataclasses.field(default_factory=list)  # encoded_video: in the stream
    video_fps: float = 0.0  # encoded_video: the stream's average rate


@dataclass
class EncodeResult:
    """Client-side view of an EncodeResponse: one tensor, split by counts on demand.

    With `copy=False` the tensor is a read-only view of the received bytes (or of Ray's object
    store): clone what you keep and never write to it.
    """

    request_id: str
    embeddings: torch.Tensor  # [sum(token_count), hidden]
    items: list[ItemEmbedding]
    extras: dict

    @property
    def token_counts(self) -> list[int]:
        return [i.token_count for i in self.items]

    def split(self) -> list[torch.Tensor]:
        return [self.embeddings[i.offset : i.offset + i.token_count] for i in self.items]


def _read_varint(buf, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _split_field(buf, start: int, end: int, field_number: int) -> tuple[tuple[int, int] | None, bytes]:
    """Find the one length-delimited field `field_number` of the message buf[start:end].

    Returns (span of its value, or None; every other field's raw bytes, for the generated
    parser). A message in which the field repeats (legal, merged by protobuf) is refused
    here; the caller falls back to the generated parser.
    """
    found, rest, pos = None, [], start
    while pos < end:
        field_start = pos
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _read_varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == _LEN:
            length, value_start = _read_varint(buf, pos)
            pos = value_start + length
            if number == field_number:
                if found is not None:
                    raise ValueError("field repeats")
                found = (value_start, pos)
                continue
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        rest.append(bytes(buf[field_start:pos]))
    if pos != end:
        raise ValueError("truncated message")
    return found, b"".join(rest)


def decode_response(data: bytes, copy: bool = True) -> EncodeResult:
    """Parse a serialised EncodeResponse without copying the tensor through protobuf.

    copy=True gives the result a tensor of its own (one GIL-free copy); copy=False a
    read-only view of `data`.
    """
    view = memoryview(data)
    try:
        span, rest = _split_field(view, 0, len(view), 2)
        header = pb.EncodeResponse.FromString(rest)
        if span is None:
            raise ValueError("no embeddings")
        data_span, tensor_rest = _split_field(view, span[0], span[1], 1)
        tensor = pb.Tensor.FromString(tensor_rest)
        payload = view[data_span[0] : data_span[1]] if data_span else b""
    except (ValueError, IndexError):  # unusual but valid encodings: let the generated parser do it
        msg = pb.EncodeResponse.FromString(data)
        header, tensor, payload = msg, msg.embeddings, msg.embeddings.data
    embeddings = _tensor_from_buffer(payload, tensor.dtype, tuple(tensor.shape), copy=copy)
    return result_from_parts(header, embeddings)


def result_from_parts(header: pb.EncodeResponse, embeddings: torch.Tensor) -> EncodeResult:
    items = [item_embedding(m) for m in header.items]
    if sum(i.token_count for i in items) != embeddings.shape[0]:
        raise ValueError("response token counts do not add up to the embedding rows")
    return EncodeResult(header.request_id, embeddings, items, msgpack.unpackb(header.extras) if header.extras else {})


def item_embedding(m: pb.ItemMetadata) -> ItemEmbedding:
    return ItemEmbedding(m.item_id, m.content_hash, m.offset, m.token_count, m.num_tiles, list(m.tokens_per_frame),
                         list(m.frame_timestamps), m.digest, m.cache_hit, list(m.frame_indices), m.video_fps)


def assemble(parts: list[EncodeResult], request_id: str = "", groups: list[list[int]] | None = None) -> EncodeResult:
    """Results of several calls (e.g. one per item, each routed to its own replica) as the one result a
    single call would give: one tensor [sum(n_i), hidden] of its own, items in order, offsets into it.
    `groups[k]`: the request's indices of part k's items (default: the parts' items one after another)."""
    if groups is None:
        if len(parts) == 1:
            return parts[0]
        starts = running_offsets([len(p.items) for p in parts])
        groups = [list(range(start, start + len(p.items))) for start, p in zip(starts, parts)]
    slots: list[tuple[ItemEmbedding, torch.Tensor] | None] = [None] * sum(len(g) for g in groups)
    for part, group in zip(parts, groups):
        for i, item, rows in zip(group, part.items, part.split()):
            slots[i] = item, rows
    offsets = running_offsets([item.token_count for item, _ in slots])
    items = [dataclasses.replace(item, offset=offset) for (item, _), offset in zip(slots, offsets)]
    return EncodeResult(request_id or parts[0].request_id, torch.cat([rows for _, rows in slots]), items,
                        {**parts[0].extras, "parts": [p.extras for p in parts]})


def decode_parts(header: bytes, payload: np.ndarray, copy: bool = False) -> EncodeResult:
    """The Ray-native form: a serialised header (`response_header`) and the tensor's bytes as a
    uint8 array (zero-copy from Ray's object store on the same node)."""
    msg = pb.EncodeResponse.FromString(header)
    embeddings = _tensor_from_buffer(payload.reshape(-1), msg.embeddings.dtype, tuple(msg.embeddings.shape), copy)
    return result_from_parts(msg, embeddings)


# ------------------------------------------------------------------ model info


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
        dynamic_resolution=None if info.dynamic is None else pb.DynamicResolution(**dataclasses.asdict(info.dynamic)),
        video_pruning_rate=info.video_pruning_rate,
        default_video_frames=info.default_video_frames,
        fingerprint=None if info.fingerprint is None else fingerprint_to_proto(info.fingerprint),
        video_frame_geometry=None if info.video_frames is None
        else pb.VideoFrameGeometry(**dataclasses.asdict(info.video_frames)),
    )


def fingerprint_to_proto(f: ModelFingerprint) -> pb.ModelFingerprint:
    return pb.ModelFingerprint(weights=f.weights, processing=f.processing, hidden_size=f.hidden_size,
                               dtype=_TORCH_TO_PB[getattr(torch, f.dtype)], numerics=f.numerics, key=f.key)


def fingerprint_from_proto(msg: pb.ModelFingerprint) -> ModelFingerprint:
    return ModelFingerprint(msg.weights, msg.processing, msg.hidden_size, str(_PB_TO_TORCH[msg.dtype]).removeprefix("torch."),
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
        dtype=_PB_TO_TORCH[msg.dtype],
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
    )


def _spec(cls, msg, field: str):
    """A config dataclass from the ModelInfo sub-message of the same fields, or None when it is unset."""
    if not msg.HasField(field):
        return None
    sub = getattr(msg, field)
    return cls(**{f.name: getattr(sub, f.name) for f in dataclasses.fields(cls)})
