"""The command line against a real server: `encode` (images and videos, saved tensors) and `bench`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from encoder_service.client.endpoint import EncoderClient
from encoder_service.contract.media import MediaInput, Modality, VideoSampling
from tests.conftest import image_bytes
from tests.video_fixture import mp4_bytes


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "encoder_service.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root, rng = tmp_path_factory.mktemp("media"), np.random.default_rng()
    (root / "photo.png").write_bytes(image_bytes(300, 200, seed=int(rng.integers(1 << 30))))
    (root / "clip.mp4").write_bytes(mp4_bytes(rng.integers(0, 256, (12, 48, 64, 3), dtype=np.uint8), fps=6))
    return root


def test_encode_saves_images_and_videos_as_safetensors_and_npy(encoder_server, media, tmp_path):
    out = tmp_path / "rows.safetensors"
    done = cli("encode", str(media / "photo.png"), str(media / "clip.mp4"), "--num-frames", "4",
               "--pruning-rate", "0.5", "--out", str(out), "--address", encoder_server.address)
    assert done.returncode == 0, done.stderr
    assert "clip.mp4: tiles=4 frames=4" in done.stdout and f"saved {out}" in done.stdout
    items = [MediaInput(Modality.IMAGE, (media / "photo.png").read_bytes()),
             MediaInput(Modality.VIDEO, (media / "clip.mp4").read_bytes(), sampling=VideoSampling(num_frames=4),
                        pruning_rate=0.5)]
    with EncoderClient(encoder_server.address) as client:
        expected = client.encode(items)
    with safe_open(out, framework="pt") as f:
        assert torch.equal(f.get_tensor("embeddings"), expected.embeddings)
        saved = json.loads(f.metadata()["items"])
    assert [i["token_count"] for i in saved] == expected.token_counts
    assert saved[1]["tokens_per_frame"] == expected.items[1].tokens_per_frame and len(saved[1]["frame_timestamps"]) == 4

    npy = tmp_path / "rows.npy"
    assert cli("encode", str(media / "photo.png"), "--out", str(npy), "--address", encoder_server.address).returncode == 0
    assert np.array_equal(np.load(npy), expected.split()[0].float().numpy())
    assert json.loads((tmp_path / "rows.json").read_text())["items"][0]["item_id"] == "photo.png"


def test_encode_refuses_clearly(encoder_server, media, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    done = cli("encode", str(media / "photo.png"), str(bad), "--address", encoder_server.address)
    assert done.returncode == 4 and "(file " + str(bad) + ")" in done.stderr and done.stderr.count("\n") == 1
    done = cli("encode", str(media / "photo.png"), "--out", str(tmp_path / "x.csv"), "--address", encoder_server.address)
    assert done.returncode == 2 and ".safetensors or .npy" in done.stderr


def test_bench_loads_a_server_and_reports(encoder_server, tmp_path):
    report = tmp_path / "report.json"
    done = cli("bench", "--address", encoder_server.address, "--duration", "3", "--concurrency", "2",
               "--images-per-request", "1", "--json", str(report))
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_text())
    assert result["requests"] > 0 and result["errors"] == {} and result["tiles_per_s"] > 0
    assert "requests/s" in done.stdout and "p99 ms" in done.stdout
    done = cli("bench", "--address", encoder_server.address, "--duration", "2", "--rate", "4", "--repeat",
               "--json", str(report))
    assert done.returncode == 0 and json.loads(report.read_text())["mode"] == "open loop 4/s"
