"""What produces the rows: one fingerprint of a served model, used by the pool's cache key, the
contract handshake (`GetModelInfo`) and the connectors of other engines.

- `weights`: SHA-256 over every tensor the encoder reads from the checkpoint, in name order, each as
  "name|dtype|shape|nbytes\\n" followed by its raw bytes as stored in the safetensors file (the
  language model's tensors are not read, so they are not part of it);
- `processing`: SHA-256 of the canonical JSON (sorted keys, no spaces) of the model's architecture
  and preprocessing config as the checkpoint describes it (`EncoderConfig.to_dict()`: tiling or
  dynamic resolution, normalisation, pixel shuffle, projector, default video frames) plus
  `PROCESSING_VERSION`, which changes whenever this package's preprocessing or token-count code
  would give other rows for the same input;
- `hidden_size` and `dtype` of the rows.
`key` digests all of them and the engine's numerics options (e.g. the GELU epilogue): two replicas
with one key give the same rows bit for bit. A consumer compares `weights`, `processing` and
`hidden_size` with what it expects (`mismatches`); it can convert another dtype itself. `contract`
digests just those three: every response carries it (`extras["model"]`), so a consumer can check
each answer, whichever replica gave it.

A client computes the expected fingerprint from the same checkpoint directory:
`encoder-service fingerprint --checkpoint DIR [--dtype bfloat16]`, or `of_checkpoint(DIR, dtype)`.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from pathlib import Path

from encoder_service.contract.model_info import ModelFingerprint

PROCESSING_VERSION = 2  # 2: video frames sampled by index with vLLM's rule


class _Safetensors:
    """A safetensors file's tensors as raw bytes (header parsed once, data memory-mapped)."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        self._header = json.loads(self._file.read(header_len))
        self._base = 8 + header_len
        self._data = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def raw(self, key: str) -> tuple[str, list[int], memoryview]:
        info = self._header[key]
        start, end = info["data_offsets"]
        return info["dtype"], info["shape"], memoryview(self._data)[self._base + start : self._base + end]

    def close(self) -> None:
        self._data.close()
        self._file.close()


def weights_digest(path: str | Path) -> str:
    """The `weights` part: every tensor the checkpoint's model family reads, from the files' raw bytes."""
    from encoder_service.models.checkpoint import find_family, read_config, shard_keys

    path = Path(path)
    family = find_family(read_config(path), path)
    by_shard = shard_keys(path, family.wanted)
    files = {shard: _Safetensors(shard) for shard in by_shard}
    h = hashlib.sha256()
    try:
        for key, shard in sorted((key, shard) for shard, keys in by_shard.items() for key in keys):
            dtype, shape, raw = files[shard].raw(key)
            h.update(f"{key}|{dtype}|{list(shape)}|{len(raw)}\n".encode())
            h.update(raw)
            raw.release()
    finally:
        for f in files.values():
            f.close()
    return "sha256:" + h.hexdigest()


def processing_digest(config: dict) -> str:
    """The `processing` part, from an EncoderConfig's `to_dict()`."""
    canonical = json.dumps({"config": config, "version": PROCESSING_VERSION}, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def of_checkpoint(path: str | Path, dtype: str = "bfloat16", numerics: str = "") -> ModelFingerprint:
    """The fingerprint of a checkpoint directory served in `dtype` (what a consumer expects)."""
    from encoder_service.models.checkpoint import checkpoint_config

    cfg = checkpoint_config(path)
    return ModelFingerprint(weights_digest(path), processing_digest(cfg.to_dict()), cfg.output_size, dtype, numerics)
