"""EncodeResponse on the wire. The embedding tensor is nearly all of a response (31 MB for two images at
LLM width 5120 in bf16), so its path is kept to the copies that cannot be avoided:
- server: everything but the rows is serialised by the generated code (`response_header`);
  `response_bytes` frames the tensor field by hand around ONE copy of the rows, from wherever they live,
  made without the GIL;
- client: `decode_response` reads the serialised bytes in place: the tensor is a view of the received
  message (plus one GIL-free copy if the caller wants a tensor of its own).
The bytes are ordinary protobuf (field order is free in the wire format): any client generated from
`protos/encoder.proto` parses them, and tests/test_wire.py checks the result equals the generated
code's own serialisation.
"""

from __future__ import annotations

import msgpack
import numpy as np
import torch

from encoder_service.contract.result import EncodeResult, ItemEmbedding
from encoder_service.contract.wire.protobuf import length_prefixed, split_field
from encoder_service.contract.wire.reference import reference_from_proto
from encoder_service.contract.wire.tensors import TORCH_TO_PB, bytes_of, tensor_from_buffer, tensor_to_proto
from encoder_service.proto import encoder_pb2 as pb

EMBEDDINGS_FIELD = 2  # EncodeResponse.embeddings
DATA_FIELD = 1  # Tensor.data


def item_to_proto(item: ItemEmbedding) -> pb.ItemMetadata:
    return pb.ItemMetadata(item_id=item.item_id, content_hash=item.content_hash, token_count=item.token_count,
                           offset=item.offset, num_tiles=item.num_tiles, tokens_per_frame=item.tokens_per_frame,
                           frame_timestamps=item.frame_timestamps, frame_indices=item.frame_indices,
                           video_fps=item.video_fps, digest=item.digest, cache_hit=item.cache_hit, cached=item.cached)


def item_from_proto(m: pb.ItemMetadata) -> ItemEmbedding:
    return ItemEmbedding(m.item_id, m.content_hash, m.offset, m.token_count, m.num_tiles, list(m.tokens_per_frame),
                         list(m.frame_timestamps), m.digest, m.cache_hit, list(m.frame_indices), m.video_fps, m.cached)


def response_header(request_id: str, items: list[ItemEmbedding], dtype: torch.dtype, hidden_size: int,
                    extras: dict, rows: int = pb.ROWS_INLINE) -> pb.EncodeResponse:
    """Everything of the response but the tensor's bytes (its dtype and shape included; [0, hidden] when the
    answer carries no rows: `rows` ROWS_CACHE_ONLY)."""
    count = sum(i.token_count for i in items) if rows == pb.ROWS_INLINE else 0
    return pb.EncodeResponse(
        request_id=request_id,
        embeddings=pb.Tensor(dtype=TORCH_TO_PB[dtype], shape=[count, hidden_size]),
        items=[item_to_proto(item) for item in items],
        extras=msgpack.packb(extras),
        rows=rows,
    )


def encode_response(result: EncodeResult) -> pb.EncodeResponse:
    """A result as a generated message (the reference the fast path is tested against)."""
    msg = response_header(result.request_id, result.items, result.dtype, result.shape[1], result.extras)
    msg.embeddings.data = tensor_to_proto(result.embeddings).data
    return msg


def response_bytes(header: pb.EncodeResponse, segments: list[torch.Tensor]) -> bytes:
    """A header (`response_header`, consumed) and the tensor's bytes (flat uint8 segments, in order: each
    item's rows where they live) as one serialised EncodeResponse, copied once without the GIL."""
    size = sum(s.numel() for s in segments)
    tensor_meta = header.embeddings.SerializeToString()
    header.ClearField("embeddings")
    data_field = length_prefixed(DATA_FIELD, size)
    prefix = (header.SerializeToString() + length_prefixed(EMBEDDINGS_FIELD, len(tensor_meta) + len(data_field) + size)
              + tensor_meta + data_field)
    return bytes_of(prefix, segments)


def decode_response(data: bytes, copy: bool = True) -> EncodeResult:
    """Parse a serialised EncodeResponse without copying the tensor through protobuf.

    copy=True gives the result a tensor of its own (one GIL-free copy); copy=False a read-only view of
    `data`.
    """
    view = memoryview(data)
    try:
        span, rest = split_field(view, 0, len(view), EMBEDDINGS_FIELD)
        header = pb.EncodeResponse.FromString(rest)
        if span is None:
            raise ValueError("no embeddings")
        data_span, tensor_rest = split_field(view, span[0], span[1], DATA_FIELD)
        tensor = pb.Tensor.FromString(tensor_rest)
        payload = view[data_span[0] : data_span[1]] if data_span else b""
    except (ValueError, IndexError):  # unusual but valid encodings: let the generated parser do it
        msg = pb.EncodeResponse.FromString(data)
        header, tensor, payload = msg, msg.embeddings, msg.embeddings.data
    embeddings = tensor_from_buffer(payload, tensor.dtype, tuple(tensor.shape), copy=copy)
    return result_from_parts(header, embeddings)


def result_from_parts(header: pb.EncodeResponse, embeddings: torch.Tensor) -> EncodeResult:
    """A response's result; one that carries no rows (ROWS_CACHE_ONLY, ROWS_BY_REFERENCE) has a [0, hidden]
    tensor, and by reference the `reference` to read them from."""
    items = [item_from_proto(m) for m in header.items]
    expected = sum(i.token_count for i in items) if header.rows == pb.ROWS_INLINE else 0
    if expected != embeddings.shape[0]:
        raise ValueError("response token counts do not add up to the embedding rows")
    reference = reference_from_proto(header.reference) if header.rows == pb.ROWS_BY_REFERENCE else None
    if reference is not None and len(reference.segments) != len(items):
        raise ValueError("a reference must name one segment per item")
    return EncodeResult(header.request_id, embeddings, items, msgpack.unpackb(header.extras) if header.extras else {},
                        reference)


def decode_parts(header: bytes, payload: np.ndarray, copy: bool = False) -> EncodeResult:
    """The Ray-native form: a serialised header (`response_header`) and the tensor's bytes as a uint8 array
    (zero-copy from Ray's object store on the same node)."""
    msg = pb.EncodeResponse.FromString(header)
    embeddings = tensor_from_buffer(payload.reshape(-1), msg.embeddings.dtype, tuple(msg.embeddings.shape), copy)
    return result_from_parts(msg, embeddings)


def response_extras(header: bytes) -> dict:
    """The extras (server timings, the model's contract digest) of a serialised response header."""
    extras = pb.EncodeResponse.FromString(header).extras
    return msgpack.unpackb(extras) if extras else {}
