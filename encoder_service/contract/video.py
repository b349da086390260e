"""A video container's headers (MP4, WebM, MKV, ... through PyAV/FFmpeg): its frame size, frame count and
rate, and which frames an item encodes, before any frame is decoded, so the token count (and the memory a
request needs) is known first.

Frames are picked by index with the rule of vLLM's video loader for Nemotron Nano VL (`nemotron_vl`, its
uniform OpenCV backend), so a consumer that lays the prompt out with vLLM's processor sees the same
frames, indices and rate (`sample_indices`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from encoder_service.contract.errors import InvalidInput
from encoder_service.contract.media import VideoSampling

CONTAINERS = "MP4, WebM, MKV, MOV or AVI"


@dataclass(frozen=True)
class VideoProbe:
    width: int
    height: int
    total_frames: int
    fps: float
    indices: tuple[int, ...]  # of the frames to sample


def open_container(data: bytes):
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError) as e:
        raise InvalidInput(f"unreadable video container ({len(data)} bytes): send {CONTAINERS}") from e
    if not container.streams.video:
        container.close()
        raise InvalidInput("the container has no video stream")
    return container


def frame_count_and_rate(container, stream) -> tuple[int, float]:
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
    with open_container(data) as container:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        total, fps = frame_count_and_rate(container, stream)
    if total <= 0:
        raise InvalidInput("the video is empty (no frames)")
    return VideoProbe(width, height, total, fps, sample_indices(total, fps, sampling, default_frames, cap))
