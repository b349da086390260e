"""Shared fixtures: a tiny random checkpoint loaded through the real loader, a real gRPC server."""

from __future__ import annotations

import io
import os

# A Serve handle router left in this process after its cluster shut down must not start a new Ray
# instance behind the next test's back (Ray connects automatically on any call otherwise).
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

import numpy as np
import pytest
from PIL import Image

from encoder_service.config import EngineConfig
from encoder_service.engine import EncoderEngine
from encoder_service.models import tiny_checkpoint_dir


def image_bytes(width: int, height: int, fmt: str = "PNG", seed: int | None = None) -> bytes:
    """A random image encoded as PNG/JPEG/WEBP (lossless formats keep pixels exact)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return tiny_checkpoint_dir(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="session")
def engine_config(tiny_checkpoint) -> EngineConfig:
    return EngineConfig(checkpoint=str(tiny_checkpoint), max_tokens_per_batch=1024, max_tokens_per_request=4096)


@pytest.fixture(scope="session")
def engine(engine_config) -> EncoderEngine:
    return EncoderEngine(engine_config)


@pytest.fixture(scope="session")
def encoder_server(engine_config):
    """A real grpc.aio server on a free loopback port, shared by the session."""
    from encoder_service.serving.api.server import BackgroundServer, ServerConfig

    with BackgroundServer(ServerConfig(port=0, engine=engine_config)) as server:
        yield server
