"""Video containers (MP4, WebM, MKV, ... through PyAV/FFmpeg): probe, sample frames, decode.

Probing reads the container's headers only, so the frame count (and thus the token count
and the memory a request needs) is known before any frame is decoded. Frames are sampled
at target times: `num_frames` spread evenly over the clip, or one every 1/`fps` seconds,
capped by `max_frames`. Decoding keeps one full-size frame at a time: each sampled frame is
handed to the caller (who resizes it) as soon as it is decoded. A target past the last
decodable frame (a clip shorter than its header says) repeats the last frame.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from encoder_service.errors import InvalidInput

CONTAINERS = "MP4, WebM, MKV, MOV or AVI"


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
class VideoProbe:
    width: int
    height: int
    duration_s: float
    targets: tuple[float, ...]  # seconds of the frames to sample


def _open(data: bytes):
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError) as e:
        raise InvalidInput(f"unreadable video container ({len(data)} bytes): send {CONTAINERS}") from e
    if not container.streams.video:
        container.close()
        raise InvalidInput("the container has no video stream")
    return container


def _duration(container, stream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000
    if stream.frames and stream.average_rate:
        return float(stream.frames / stream.average_rate)
    raise InvalidInput("the video's duration is unknown (no duration or frame count in its headers)")


def sample_times(duration_s: float, sampling: VideoSampling, default_frames: int, cap: int) -> tuple[float, ...]:
    """Target times: every 1/fps s (at most `limit` frames, else spread evenly), or n frames spread evenly."""
    limit = min(cap, sampling.max_frames) if sampling.max_frames else cap
    if sampling.num_frames > limit:
        raise InvalidInput(f"{sampling.num_frames} frames requested, more than the limit of {limit}")
    if sampling.fps and not sampling.num_frames:
        n = max(1, math.floor(duration_s * sampling.fps))
        if n <= limit:
            return tuple(i / sampling.fps for i in range(n))
    n = min(sampling.num_frames or default_frames, limit)
    return tuple(i * duration_s / n for i in range(n))


def probe(data: bytes, sampling: VideoSampling, default_frames: int, cap: int) -> VideoProbe:
    """Headers only: frame size, duration and the sampled frames' target times."""
    with _open(data) as container:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        duration = _duration(container, stream)
    if duration <= 0:
        raise InvalidInput("the video is empty (zero duration)")
    return VideoProbe(width, height, duration, sample_times(duration, sampling, default_frames, cap))


def decode_sampled(data: bytes, targets: tuple[float, ...], consume: Callable[[int, np.ndarray, float], None]) -> None:
    """Decode once, front to back; `consume(i, rgb [H, W, 3], seconds)` for the frame at or after
    each target time, as soon as it is decoded."""
    import av

    with _open(data) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        nxt, last = 0, None
        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else 0.0
                while nxt < len(targets) and t + 1e-6 >= targets[nxt]:
                    consume(nxt, frame.to_ndarray(format="rgb24"), t)
                    nxt += 1
                if nxt == len(targets):
                    return
                last = frame
        except av.error.FFmpegError as e:
            if last is None:
                raise InvalidInput(f"corrupt video: {e}") from e
        if last is None:
            raise InvalidInput("the video has no decodable frame")
        rgb, t = last.to_ndarray(format="rgb24"), last.time or 0.0
        for i in range(nxt, len(targets)):
            consume(i, rgb, t)

