"""Real video files made on the spot (PyAV + libx264), for tests and benches."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
import pytest

try:
    import av
except ImportError:  # a dependency of the package, but the GPU machine lacks it: tests needing an MP4 skip there
    av = None


def mp4_bytes(frames: np.ndarray, fps: int | Fraction = 10) -> bytes:
    """frames [T, H, W, 3] uint8 as an H.264 MP4 (qp 0: static frames decode identical). Without PyAV the
    calling test (or fixture) is skipped."""
    if av is None:
        pytest.skip("PyAV is not installed: no MP4 to test with")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"qp": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
