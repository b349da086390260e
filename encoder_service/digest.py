"""What identifies an item's rows: the digest of its media bytes, and the key that adds everything
else the rows depend on.

The media digest is `sha256:` + 64 lowercase hex digits, the SHA-256 of
  - encoded_image / encoded_video: the file's bytes, exactly (what `sha256sum photo.jpg` prints);
  - raw_pixels: b"raw_pixels:" + the shape as decimal "H,W,3" (or "F,H,W,3") + b":" + the uint8 bytes;
  - encoded_frames: b"encoded_frames:" + for each frame its byte length (8 bytes, little-endian) + its bytes.
Any client can compute it (it is spelled out in protos/encoder.proto) and send it instead of the
bytes; the server computes it itself from any bytes it receives, so a client-supplied hash never
selects rows on its own.

The item key covers everything else that changes the rows: the model fingerprint
(`fingerprint.ModelFingerprint.key`), the cache namespace (a tenant), the modality, and the options
(video sampling as requested, the EVS rate actually applied). Two items with one key have the same
rows, bit for bit.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from encoder_service.errors import InvalidInput

PREFIX = "sha256:"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class MediaDigest:
    """An item sent by digest only: the server has its rows (or is encoding them), or answers CACHE_MISS."""

    value: str

    def __post_init__(self):
        if not isinstance(self.value, str) or not _DIGEST.fullmatch(self.value):
            shown = self.value[:80] if isinstance(self.value, str) else type(self.value).__name__
            raise InvalidInput(f"malformed media digest {shown!r}: expected 'sha256:' and 64 lowercase hex digits")


def is_media_digest(text: str) -> bool:
    """Whether `text` is a media digest as defined above (e.g. an item identifier another engine uses)."""
    return isinstance(text, str) and _DIGEST.fullmatch(text) is not None


def media_digest(data: bytes | bytearray | memoryview | np.ndarray | list[bytes] | MediaDigest) -> str:
    """The digest of an item's media, as defined above (a MediaDigest is already one)."""
    if isinstance(data, MediaDigest):
        return data.value
    h = hashlib.sha256()
    if isinstance(data, np.ndarray):
        h.update(b"raw_pixels:" + ",".join(map(str, data.shape)).encode() + b":")
        h.update(np.ascontiguousarray(data))  # its bytes (raw pixels are uint8; others are refused later)
    elif isinstance(data, list):
        h.update(b"encoded_frames:")
        for frame in data:
            h.update(len(frame).to_bytes(8, "little"))
            h.update(frame)
    else:
        h.update(data)
    return PREFIX + h.hexdigest()


def item_key(model_key: str, namespace: str, modality: str, digest: str, sampling: tuple | None,
             pruning_rate: float) -> str:
    """The cache key of an item's rows. `sampling`: (num_frames, fps, max_frames) as the request gave
    them (None: the deployment's default frames); `pruning_rate`: the EVS rate that will be applied."""
    sampled = "default" if sampling is None else ",".join(repr(float(v)) for v in sampling)
    fields = (model_key, namespace, modality, digest, sampled, float(pruning_rate).hex())
    return hashlib.sha256("\x1f".join(fields).encode()).hexdigest()
