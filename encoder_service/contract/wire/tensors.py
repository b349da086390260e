"""Tensors on the wire: raw bytes + dtype code + shape (bf16 has no NumPy dtype: bytes are uint8 views,
lossless for every dtype), and one GIL-free copy of large rows into a message's bytes."""

from __future__ import annotations

import ctypes
import math
import warnings

import torch

from encoder_service.contract.errors import InvalidInput
from encoder_service.proto import encoder_pb2 as pb

# Views of received bytes are read-only by contract (see EncodeResult); torch warns on every one.
warnings.filterwarnings("ignore", message="The given (buffer|NumPy array) is not writable", category=UserWarning)

TORCH_TO_PB = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.uint8: pb.DTYPE_UINT8,
}
PB_TO_TORCH = {v: k for k, v in TORCH_TO_PB.items()}


def element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    t = t.detach().contiguous().cpu()
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(data=data, dtype=TORCH_TO_PB[t.dtype], shape=list(t.shape))


def tensor_from_buffer(data, dtype_code: int, shape: tuple[int, ...], copy: bool) -> torch.Tensor:
    """A tensor over `data` (bytes-like), checked against dtype and shape."""
    if dtype_code not in PB_TO_TORCH:
        raise InvalidInput(f"unknown tensor dtype {dtype_code}")
    dtype = PB_TO_TORCH[dtype_code]
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
    return tensor_from_buffer(msg.data, msg.dtype, tuple(msg.shape), copy=True)


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]


def bytes_of(prefix: bytes, segments: list[torch.Tensor]) -> bytes:
    """`prefix + the segments` (flat uint8) as one new `bytes` object, the tensor bytes copied with the
    GIL released.

    gRPC's Python layer sends only `bytes`, and every CPython way of building a large `bytes` from a
    buffer (join, concatenation, bytes(memoryview)) copies while holding the GIL, during which a model
    thread in the same process cannot launch kernels. So the object is allocated uninitialised
    (`PyBytes_FromStringAndSize(NULL, n)`, the C API's way to build a bytes object in place; `bytes(n)`
    would zero it, also under the GIL) and filled by torch, which releases the GIL. The object is new
    and unshared (and never hashed) until it is filled, so nothing can observe it change.
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
