"""Decoding a video container's sampled frames (PyAV/FFmpeg); which frames, and the container's headers,
are `contract.video`'s. Decoding keeps one full-size frame at a time: each sampled frame is handed to
the caller (who resizes it) as soon as it is decoded. An index past the last decodable frame (a clip
shorter than its header says) repeats the last frame.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from encoder_service.contract.errors import InvalidInput
from encoder_service.contract.video import open_container


def decode_sampled(data: bytes, indices: tuple[int, ...], consume: Callable[[int, np.ndarray, float], None]) -> None:
    """Decode once, front to back; `consume(i, rgb [H, W, 3], seconds)` for the `indices[i]`-th
    decoded frame, as soon as it is decoded."""
    import av

    with open_container(data) as container:
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
