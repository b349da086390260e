"""The frames SGLang's encoder receiver reads (sglang 0.5.23, `sglang.srt.disaggregation.encoder`): frame 0 a
pickled `receiver.EmbeddingData` without its tensor, frame 1 the tensor's raw bytes (a failure: frame 0 only,
with `error_msg` and `error_code` set).

SGLang's protocol is pickle; this package never *loads* a pickle. It *writes* these frames itself, opcode by
opcode through the standard library's pure-Python pickler, naming only globals that SGLang's own
`safe_pickle_loads` allowlists (`EmbeddingData`, `Modality`, a torch dtype, copyreg's `__newobj__`) and
builtins otherwise: nothing of this package, and no numpy, is ever named in a frame, and sglang need not be
installed here. tests/test_sglang.py loads every kind of frame with SGLang's own unpickler.
"""

from __future__ import annotations

import copyreg
import io
import pickle
from dataclasses import dataclass

import torch

RECEIVER = "sglang.srt.disaggregation.encoder.receiver"
MODALITY_MODULE = "sglang.srt.multimodal.modality"
MODALITIES = {"IMAGE": 1, "VIDEO": 2, "AUDIO": 3}  # sglang's Modality enum values


@dataclass(frozen=True)
class _Global:
    """A class or function of another program, named in a pickle without being imported here."""

    module: str
    name: str

    def __call__(self, *args):  # the pickler wants reduce functions callable; never called here
        raise TypeError(f"{self.module}.{self.name} is only named, never called, here")


EMBEDDING_DATA = _Global(RECEIVER, "EmbeddingData")
MODALITY = _Global(MODALITY_MODULE, "Modality")


class _Instance:
    """An instance of a `_Global` class with this state (`copyreg.__newobj__` then BUILD)."""

    def __init__(self, cls: _Global, state: dict):
        self.cls, self.state = cls, state


class _Call:
    """`func(*args)` when unpickled (REDUCE): an enum member by value."""

    def __init__(self, func: _Global, args: tuple):
        self.func, self.args = func, args


class _Writer(pickle._Pickler):  # the pure-Python pickler: its save_global can be told what to name
    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.save(obj.module)
            self.save(obj.name)
            self.write(pickle.STACK_GLOBAL)
        elif isinstance(obj, _Instance):
            self.save_reduce(copyreg.__newobj__, (obj.cls,), obj.state)
        elif isinstance(obj, _Call):
            self.save_reduce(obj.func, obj.args)
        elif isinstance(obj, torch.dtype):
            self.save(_Global("torch", str(obj).removeprefix("torch.")))
        else:
            super().save(obj, save_persistent_id)


def _dumps(obj) -> bytes:
    out = io.BytesIO()
    _Writer(out, protocol=4).dump(obj)
    return out.getvalue()


def _state(req_id: str, num_parts: int, part_idx: int, modality: str, grid: list | None, dtype: torch.dtype | None,
           shape: list[int] | None, error_msg: str | None = None, error_code: int | None = None) -> dict:
    """EmbeddingData's attributes, as its constructor sets them (receiver.py, sglang 0.5.23)."""
    return {"req_id": req_id, "num_parts": num_parts, "part_idx": part_idx, "grid_dim": grid,
            "modality": _Call(MODALITY, (MODALITIES[modality],)), "embedding": None, "send_time": None,
            "_mr_ptr": None, "dtype": dtype, "shape": shape, "error_msg": error_msg, "error_code": error_code,
            "video_timestamps": None, "second_per_grid_ts": None}


def embedding_frames(req_id: str, num_parts: int, part_idx: int, modality: str, grid: list[list[int]],
                     rows: torch.Tensor) -> list:
    """One part's message: its metadata, then its rows [n, hidden] as contiguous bytes (no copy if already
    contiguous)."""
    rows = rows.contiguous()
    header = _dumps(_Instance(EMBEDDING_DATA, _state(req_id, num_parts, part_idx, modality, grid, rows.dtype,
                                                     list(rows.shape))))
    return [header, memoryview(rows.view(torch.uint8).reshape(-1).numpy())]


def error_frames(req_id: str, num_parts: int, part_idx: int, modality: str, message: str, code: int) -> list:
    """One part's failure: the receiver fails the request with `message` and `code` (an HTTP status)."""
    return [_dumps(_Instance(EMBEDDING_DATA, _state(req_id, num_parts, part_idx, modality, None, None, None,
                                                    message, int(code))))]
