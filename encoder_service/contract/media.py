"""What a request carries: media items, and what identifies an item's rows.

The media digest is `sha256:` + 64 lowercase hex digits, the SHA-256 of
  - encoded_image / encoded_video: the file's bytes, exactly (what `sha256sum photo.jpg` prints);
  - raw_pixels: b"raw_pixels:" + the shape as decimal "H,W,3" (or "F,H,W,3") + b":" + the uint8 bytes;
  - encoded_frames: b"encoded_frames:" + for each frame its byte length (8 bytes, little-endian) + its bytes.
Any client can compute it (it is spelled out in protos/encoder.proto) and send it instead of the
bytes; the server computes it itself from any bytes it receives, so a client-supplied hash never
selects rows on its own.

The item key covers everything else that changes the rows: the model fingerprint
(`ModelFingerprint.key`), the cache namespace (a tenant), the modality, and the options (video
sampling as requested, the EVS rate actually applied). Two items with one key have the same rows,
bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from enum import Enum

import numpy as np

from encoder_service.contract.errors import InvalidInput

DIGEST_PREFIX = "sha256:"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


class Modality(str, Enum):
    IMAGE = "image"
    VIDEO = "video"


class Source(str, Enum):
    """How an item's media travel: the `source` oneof of protos/encoder.proto's MediaItem."""

    ENCODED_IMAGE = "encoded_image"  # JPEG/PNG/WebP bytes
    RAW_PIXELS = "raw_pixels"  # uint8 [H, W, 3] (image) or [F, H, W, 3] (video)
    ENCODED_FRAMES = "encoded_frames"  # a video as a list of encoded images
    ENCODED_VIDEO = "encoded_video"  # a video container's bytes (MP4, WebM, ...)
    DIGEST = "digest"  # no media: the rows of a cached item, by its media digest


@dataclass(frozen=True)
class MediaDigest:
    """An item sent by digest only: the server has its rows (or is encoding them), or answers CACHE_MISS."""

    value: str

    def __post_init__(self):
        if not isinstance(self.value, str) or not _DIGEST.fullmatch(self.value):
            shown = self.value[:80] if isinstance(self.value, str) else type(self.value).__name__
            raise InvalidInput(f"malformed media digest {shown!r}: expected 'sha256:' and 64 lowercase hex digits")


@dataclass(frozen=True)
class VideoSampling:
    """Which frames of a video to encode. `num_frames` wins over `fps`; neither: the deployment default."""

    num_frames: int = 0
    fps: float = 0.0
    max_frames: int = 0  # a cap of the caller's own (the deployment's cap always applies)

    def __post_init__(self):
        if self.num_frames < 0 or self.fps < 0 or self.max_frames < 0 or not math.isfinite(self.fps):
            raise InvalidInput(f"invalid video sampling {self}")


@dataclass(frozen=True)
class SampledFrames:
    """The frames of a container an item encodes: what a consumer needs to lay the video out as the
    model's processor does (Nemotron prints `index * int(1000 / fps) / 1000` seconds per frame)."""

    indices: tuple[int, ...]  # of each sampled frame in the stream, in order
    fps: float  # the stream's average frame rate
    times: tuple[float, ...] = ()  # presentation times (s) of the decoded frames, once decoded


MediaData = bytes | bytearray | memoryview | np.ndarray | list[bytes] | MediaDigest


@dataclass
class MediaInput:
    """One item of an Encode request, before decoding.

    data: encoded image bytes (image), a uint8 array [H, W, 3] (image) or [F, H, W, 3] (video), a list
    of encoded frames (video), a video container's bytes (video), or a MediaDigest (the rows of an item
    the server caches). sampling: which frames of a video container to encode. pruning_rate: EVS rate q
    for a video (None: the deployment's default). content_hash: an opaque label the server echoes and
    never uses to select rows.
    """

    modality: Modality
    data: MediaData
    item_id: str = ""
    content_hash: str = ""
    sampling: VideoSampling | None = None
    pruning_rate: float | None = None

    @property
    def source(self) -> Source:
        """How the media travel."""
        return source_of(self.data, self.modality)


def source_of(data: MediaData, modality: Modality = Modality.IMAGE) -> Source:
    """The one dispatch over an item's data type (bytes are an encoded image or video by modality)."""
    if isinstance(data, MediaDigest):
        return Source.DIGEST
    if isinstance(data, np.ndarray):
        return Source.RAW_PIXELS
    if isinstance(data, list):
        return Source.ENCODED_FRAMES
    return Source.ENCODED_VIDEO if modality == Modality.VIDEO else Source.ENCODED_IMAGE


def is_media_digest(text: str) -> bool:
    """Whether `text` is a media digest as defined above (e.g. an item identifier another engine uses)."""
    return isinstance(text, str) and _DIGEST.fullmatch(text) is not None


def media_digest(data: MediaData) -> str:
    """The digest of an item's media, as defined above (a MediaDigest is already one)."""
    source = source_of(data)
    if source == Source.DIGEST:
        return data.value
    h = hashlib.sha256()
    if source == Source.RAW_PIXELS:
        h.update(b"raw_pixels:" + ",".join(map(str, data.shape)).encode() + b":")
        h.update(np.ascontiguousarray(data))  # its bytes (raw pixels are uint8; others are refused later)
    elif source == Source.ENCODED_FRAMES:
        h.update(b"encoded_frames:")
        for frame in data:
            h.update(len(frame).to_bytes(8, "little"))
            h.update(frame)
    else:
        h.update(data)
    return DIGEST_PREFIX + h.hexdigest()


def item_key(model_key: str, namespace: str, modality: str, digest: str, sampling: tuple | None,
             pruning_rate: float) -> str:
    """The cache key of an item's rows. `sampling`: (num_frames, fps, max_frames) as the request gave
    them (None: the deployment's default frames); `pruning_rate`: the EVS rate that will be applied."""
    sampled = "default" if sampling is None else ",".join(repr(float(v)) for v in sampling)
    fields = (model_key, namespace, modality, digest, sampled, float(pruning_rate).hex())
    return hashlib.sha256("\x1f".join(fields).encode()).hexdigest()
