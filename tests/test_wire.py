"""Tensors cross the wire as raw bytes + dtype + shape, losslessly, for every served dtype."""

import pytest
import torch

from encoder_service.contract.errors import InvalidInput
from encoder_service.contract.result import EncodeResult, describe_item, running_offsets
from encoder_service.contract.wire.responses import (
    decode_parts,
    decode_response,
    encode_response,
    response_bytes,
    response_header,
)
from encoder_service.contract.wire.tensors import tensor_from_proto, tensor_to_proto
from encoder_service.proto import encoder_pb2 as pb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8])
def test_tensor_roundtrip_is_bit_exact(dtype):
    t = (torch.randn(37, 19) * 50).to(dtype)
    back = tensor_from_proto(pb.Tensor.FromString(tensor_to_proto(t).SerializeToString()))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_non_contiguous_and_empty_tensors():
    t = torch.randn(8, 6).t()
    assert torch.equal(tensor_from_proto(tensor_to_proto(t)), t)
    empty = tensor_from_proto(tensor_to_proto(torch.empty(0, 64)))
    assert empty.shape == (0, 64)


def test_byte_count_must_match_shape():
    msg = tensor_to_proto(torch.zeros(4, 4))
    msg.shape[:] = [4, 5]
    with pytest.raises(InvalidInput, match="needs 80 bytes"):
        tensor_from_proto(msg)


def _output(dtype, rows=23, hidden=17, counts=(5, 0, 18)):
    emb = (torch.randn(rows, hidden) * 10).to(dtype)
    items = [describe_item(offset, n, tiles, frames, item_id=f"item{i}", content_hash=f"h{i}")
             for i, (offset, n, tiles, frames) in enumerate(zip(running_offsets(counts), counts, [1, 0, 2],
                                                                 [[], [], [9, 9]]))]
    return EncodeResult("r-1", emb, items, {"forward_ms": 1.5})


def _header(out):
    return response_header(out.request_id, out.items, out.dtype, out.shape[1], out.extras)


def _response_bytes(out):
    """As the serving path builds a response: the header, then each item's rows (a segment each, wherever
    they live) framed around it."""
    segments = [rows.contiguous().view(torch.uint8).reshape(-1) for rows in out.split()]
    return response_bytes(_header(out), segments)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fast_response_bytes_parse_to_the_reference_message(dtype):
    """Any protobuf parser reads the hand-framed bytes as the generated code's own message."""
    out = _output(dtype)
    fast = _response_bytes(out)
    assert pb.EncodeResponse.FromString(fast) == encode_response(out)


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_client_parse_is_bit_exact_for_fast_and_standard_encodings(dtype, copy):
    out = _output(dtype)
    standard = encode_response(out).SerializeToString()  # embeddings field first
    for data in (_response_bytes(out), standard):
        result = decode_response(data, copy=copy)
        assert result.embeddings.dtype == dtype and result.embeddings.shape == out.embeddings.shape
        assert torch.equal(result.embeddings.view(torch.uint8), out.embeddings.view(torch.uint8))
        assert result.token_counts == [5, 0, 18] and [i.offset for i in result.items] == [0, 5, 5]
        assert [i.item_id for i in result.items] == ["item0", "item1", "item2"]
        assert result.items[2].tokens_per_frame == [9, 9] and result.extras == {"forward_ms": 1.5}
        assert [t.shape[0] for t in result.split()] == [5, 0, 18]


def test_copy_owns_its_memory_and_view_does_not():
    data = _response_bytes(_output(torch.float32))
    owned = decode_response(data, copy=True).embeddings
    view = decode_response(data, copy=False).embeddings
    owned.zero_()  # writable, and independent of the received bytes
    assert torch.equal(decode_response(data).embeddings, view) and not torch.equal(owned, view)


def test_empty_response_and_mismatched_bytes():
    empty = _output(torch.float32, rows=0, counts=(0, 0, 0))
    assert decode_response(_response_bytes(empty)).embeddings.shape == (0, 17)
    bad = encode_response(_output(torch.float32))
    bad.embeddings.shape[:] = [24, 17]
    with pytest.raises(InvalidInput, match="needs"):
        decode_response(bad.SerializeToString())


def test_native_parts_round_trip():
    out = _output(torch.bfloat16)
    header = _header(out).SerializeToString()
    payload = out.embeddings.view(torch.uint8).numpy()
    result = decode_parts(header, payload)
    assert torch.equal(result.embeddings.view(torch.uint8), out.embeddings.view(torch.uint8))
    assert result.token_counts == out.token_counts
