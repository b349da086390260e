"""Tensors cross the wire as raw bytes + dtype + shape, losslessly, for every served dtype."""

import pytest
import torch

from encoder_service import wire
from encoder_service.errors import InvalidInput
from encoder_service.proto import encoder_pb2 as pb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8])
def test_tensor_roundtrip_is_bit_exact(dtype):
    t = (torch.randn(37, 19) * 50).to(dtype)
    back = wire.tensor_from_proto(pb.Tensor.FromString(wire.tensor_to_proto(t).SerializeToString()))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))


def test_non_contiguous_and_empty_tensors():
    t = torch.randn(8, 6).t()
    assert torch.equal(wire.tensor_from_proto(wire.tensor_to_proto(t)), t)
    empty = wire.tensor_from_proto(wire.tensor_to_proto(torch.empty(0, 64)))
    assert empty.shape == (0, 64)


def test_byte_count_must_match_shape():
    msg = wire.tensor_to_proto(torch.zeros(4, 4))
    msg.shape[:] = [4, 5]
    with pytest.raises(InvalidInput, match="needs 80 bytes"):
        wire.tensor_from_proto(msg)
