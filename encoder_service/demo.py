"""End-to-end demo on the embedded tiny model: a real gRPC server on loopback, two images, one Encode."""

from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image

from encoder_service.client import EncoderClient
from encoder_service.config import EngineConfig
from encoder_service.processor import MediaInput, Modality
from encoder_service.server import BackgroundServer, ServerConfig


def demo_images() -> list[MediaInput]:
    rng = np.random.default_rng(0)
    items = []
    for name, (w, h) in {"photo.jpg": (640, 480), "document.png": (300, 900)}.items():
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        items.append(MediaInput(Modality.IMAGE, buf.getvalue(), item_id=name))
    return items


def run_demo(args: argparse.Namespace) -> int:
    with BackgroundServer(ServerConfig(port=0, engine=EngineConfig())) as server:
        with EncoderClient(server.address) as client:
            client.wait_ready()
            info = client.model_info()
            result = client.encode(demo_images())
    print(f"encoder {info.model_name} on {server.address}: hidden={info.hidden_size}, tokens/tile={info.tiling.tokens_per_tile}")
    print(f"one tensor {tuple(result.embeddings.shape)} {result.embeddings.dtype}, counts {result.token_counts}")
    for item in result.items:
        print(f"  {item.item_id}: {item.num_tiles} tiles -> rows [{item.offset}, {item.offset + item.token_count})")
    return 0
