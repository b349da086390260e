"""Video containers (MP4, WebM, MKV, ... through PyAV/FFmpeg): probe, sample frames, decode.

Probing reads the container's headers only, so the frame count (and thus the token count
and the memory a request needs) is known before any frame is decoded. Frames are picked by
index with the rule of vLLM's video loader for Nemotron Nano VL (`nemotron_vl`, its uniform
OpenCV backend), so a consumer that lays the prompt out with vLLM's processor sees the same
frames, indices and rate (`sample_indices`). Decoding keeps one full-size frame at a time: each
sampled frame is handed to the caller (who resizes it) as soon as it is decoded. An index past
the last decodable frame (a clip shorter than its header says) repeats the last frame.
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
class SampledFrames:
    """The frames of a container an item encodes: what a consumer needs to lay the video out as the
    model's processor does (Nemotron prints `index * int(1000 / fps) / 1000` seconds per frame)."""

    indices: tuple[int, ...]  # of each sampled frame in the stream, in order
    fps: float  # the stream's average frame rate
    times: tuple[float, ...] = ()  # presentation times (s) of the decoded frames, once decoded


@dataclass(frozen=True)
class VideoProbe:
    width: int
    height: int
    total_frames: int
    fps: float
    indices: tuple[int, ...]  # of the frames to sample


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


def _frame_count_and_rate(container, stream) -> tuple[int, float]:
    """Frames and rate as OpenCV's FFmpeg reader reports them (the header's frame count, else
    duration x rate rounded), which is what vLLM's loader samples from."""
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    if fps <= 0:
        raise InvalidInput("the video's frame rate is unknown (none in its headers)")
    total = stream.frames
    if not total:
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / 1_000_000
        else:
            raise InvalidInput("the video's length is unknown (no frame count or duration in its headers)")
        total = math.floor(duration * fps + 0.5)
    return int(total), fps


def sample_indices(total: int, fps: float, sampling: VideoSampling, default_frames: int, cap: int) -> tuple[int, ...]:
    """vLLM's uniform rule (`VideoBackend.compute_frames_index_to_sample`): n = total, at most
    `num_frames`, at most floor(duration x `fps`) (duration = total / rate), at least 1; every frame
    when n = total, else linspace(0, total - 1, n) truncated to ints. Without `num_frames` or `fps`
    the deployment's `default_frames` is the `num_frames`; `max_frames` and the deployment's cap
    bound n (an explicit `num_frames` above the cap is refused rather than silently cut)."""
    limit = min(cap, sampling.max_frames) if sampling.max_frames else cap
    if sampling.num_frames > limit:
        raise InvalidInput(f"{sampling.num_frames} frames requested, more than the limit of {limit}")
    n = total
    num_frames = sampling.num_frames or (0 if sampling.fps else default_frames)
    if num_frames > 0:
        n = min(num_frames, total)
    if sampling.fps > 0:
        n = min(n, math.floor(total / fps * sampling.fps))
    n = max(1, min(n, limit))
    if n == total:
        return tuple(range(total))
    return tuple(int(i) for i in np.linspace(0, total - 1, n, dtype=int))


def probe(data: bytes, sampling: VideoSampling, default_frames: int, cap: int) -> VideoProbe:
    """Headers only: frame size, frame count, rate and the indices of the frames to sample."""
    with _open(data) as container:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        total, fps = _frame_count_and_rate(container, stream)
    if total <= 0:
        raise InvalidInput("the video is empty (no frames)")
    return VideoProbe(width, height, total, fps, sample_indices(total, fps, sampling, default_frames, cap))


def decode_sampled(data: bytes, indices: tuple[int, ...], consume: Callable[[int, np.ndarray, float], None]) -> None:
    """Decode once, front to back; `consume(i, rgb [H, W, 3], seconds)` for the `indices[i]`-th
    decoded frame, as soon as it is decoded."""
    import av

    with _open(data) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        nxt, last = 0, None
        try:
            for position, frame in enumerate(container.decode(stream)):
                while nxt < len(indices) and indices[nxt] <= position:
                    consume(nxt, frame.to_ndarray(format="rgb24"), _time(frame))
                    nxt += 1
                if nxt == len(indices):
                    return
                last = frame
        except av.error.FFmpegError as e:
            if last is None:
                raise InvalidInput(f"corrupt video: {e}") from e
        if last is None:
            raise InvalidInput("the video has no decodable frame")
        rgb, t = last.to_ndarray(format="rgb24"), _time(last)
        for i in range(nxt, len(indices)):
            consume(i, rgb, t)


def _time(frame) -> float:
    return frame.time if frame.time is not None else 0.0
