"""The pool as SGLang's encoder server: SGLang's own receiver code (sglang 0.5.23, its environment built by
scripts/sglang_env.sh on first use) against real pools through the pool's SGLang front
(`encoder_service.integrations.sglang`), over real HTTP and ZMQ. What SGLang assembles must be the pool's rows
bit for bit. A language server itself cannot run on these machines (SGLang's runtime is CUDA-only).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from encoder_service.client.endpoint import EncoderClient
from encoder_service.contract.media import MediaInput, Modality, media_digest
from encoder_service.serving.api.serve.local import free_port
from encoder_service.serving.api.server import BackgroundServer, ServerConfig
from encoder_service.serving.host.pipeline import PipelineConfig
from encoder_service.integrations.vllm.launch import stop, wait_http
from tests.conftest import environment_python, image_bytes, pool_token
from tests.video_fixture import mp4_bytes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sglang_python() -> str:
    """SGLang's test environment (scripts/sglang_env.sh: sglang over the vLLM environment's packages)."""
    return environment_python("sglang_env.sh", ".venv-sglang")


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def start_front(python: str, pool: str, tmp_path: Path, name: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen([python, "-m", "encoder_service.cli", "sglang-encoder", "--pool", pool, "--port",
                             str(port)], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": ""})
    wait_http(f"http://127.0.0.1:{port}/health", proc, log, timeout_s=60)
    return proc, f"http://127.0.0.1:{port}"


def scenario(python: str, plan: dict, out: Path) -> dict:
    (out.parent / f"{out.name}.json").write_text(json.dumps(plan))
    done = subprocess.run([python, str(ROOT / "tests" / "sglang_scenarios.py"), str(out.parent / f"{out.name}.json"),
                           str(out)], capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert (out / "result.json").exists(), f"the scenario died ({done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def pool():
    """A pool with auth (the fronts send its token) and what it answers for the media used here."""
    with pool_token():
        with BackgroundServer(ServerConfig(port=0, pipeline=PipelineConfig(preprocess_workers=1, arena_mb=64,
                                                                           cache_mb=64))) as server:
            yield server


def test_sglangs_receiver_assembles_the_pools_rows_bit_for_bit(sglang_python, pool, tmp_path):
    """Two encoder URLs (the request's items split over them by SGLang), TP=2 (both ranks register and both
    get every part), images and a video: each rank's assembled tensors are the pool's rows, in SGLang's
    order; a raw JSON exchange gives a frame SGLang's unpickler accepts, [rows, hidden] of the pool's bytes."""
    images = [image_bytes(w, h) for w, h in ((200, 150), (64, 64), (333, 120), (90, 300), (512, 400))]
    video = mp4_bytes(torch.randint(0, 256, (12, 48, 64, 3), dtype=torch.uint8).numpy())
    fronts = [start_front(sglang_python, pool.address, tmp_path, f"front{i}") for i in range(2)]
    try:
        result = scenario(sglang_python, {
            "encoder_urls": [url for _, url in fronts], "tp": 2,
            "requests": [{"rid": "req-a", "images": [data_url(d, "image/png") for d in images],
                          "videos": [data_url(video, "video/mp4")]}],
            "raw": {"url": fronts[0][1], "item": {"url": data_url(images[0], "image/png"),
                                                  "content_hash": media_digest(images[0])}},
        }, tmp_path / "ok")
    finally:
        stop(*[proc for proc, _ in fronts])
    (outcome,) = result["requests"]
    assert outcome["dispatch_error"] is None and [r["status"] for r in outcome["ranks"]] == ["SUCCESS", "SUCCESS"]
    assert outcome["assigned"]["IMAGE"] in ([2, 3], [3, 2])  # split over both encoders
    with EncoderClient(pool.address) as client:
        expected_images = client.encode([MediaInput(Modality.IMAGE, d) for d in images])
        expected_video = client.encode([MediaInput(Modality.VIDEO, video)])
    for rank in range(2):
        assembled = load_file(tmp_path / "ok" / f"req-a.rank{rank}.safetensors")
        assert torch.equal(assembled["IMAGE"], expected_images.embeddings)
        assert torch.equal(assembled["VIDEO"], expected_video.embeddings)
        grids = outcome["ranks"][rank]["grids"]
        assert [g[0] * g[1] * g[2] for g in grids["img_grid_thw"]] == expected_images.token_counts
        (frames,) = grids["video_grid_thw"]
        assert frames[0] == len(expected_video.items[0].tokens_per_frame)
    raw = result["raw"]
    assert raw["registered"] == [200, None] and raw["encoded"] == [200, None] and raw["frames"] == 2
    assert raw["cls"] == "sglang.srt.disaggregation.encoder.receiver.EmbeddingData"
    expected = expected_images.embeddings[:expected_images.token_counts[0]]
    assert raw["shape"] == list(expected.shape) and raw["req_id"] == "raw_local_part_0"
    assert torch.equal(load_file(tmp_path / "ok" / "raw.safetensors")["rows"], expected)


def test_every_failure_fails_the_request_at_every_rank_and_the_front_serves_on(sglang_python, tmp_path):
    """Undecodable media, a content_hash that is not the media's, a path on the encoder's host, a URL into the
    encoder's own network, the pool gone: each rank fails the request with the reason, /encode answers an error, and the front keeps
    serving (and its health says whether the pool answers)."""
    good = image_bytes(120, 90)
    with pool_token(), BackgroundServer(ServerConfig(port=0, pipeline=PipelineConfig(
            preprocess_workers=1, arena_mb=32, cache_mb=32))) as pool:
        failures(sglang_python, pool, good, tmp_path)


def failures(sglang_python, pool, good: bytes, tmp_path: Path) -> None:
    front, url = start_front(sglang_python, pool.address, tmp_path, "front")
    try:
        result = scenario(sglang_python, {"encoder_urls": [url], "tp": 2, "requests": [
            {"rid": "bad-data", "images": ["data:image/png;base64,!!!"], "videos": []},
            {"rid": "bad-hash", "images": [data_url(good, "image/png")], "videos": [],
             "content_hashes": ["sha256:" + "0" * 64]},
            {"rid": "local-path", "images": ["/etc/passwd"], "videos": []},
            # A URL into the encoder's own network (here: the front's own health endpoint on loopback).
            {"rid": "internal-host", "images": [f"{url}/health"], "videos": []},
            {"rid": "good", "images": [data_url(good, "image/png")], "videos": []},
        ]}, tmp_path / "bad")
        outcomes = {o["rid"]: o for o in result["requests"]}
        for rid, reason in (("bad-data", "undecodable"), ("bad-hash", "content_hash"), ("local-path", "local paths"),
                            ("internal-host", "non-public address")):
            ranks = outcomes[rid]["ranks"]
            assert [r["status"] for r in ranks] == ["FAIL", "FAIL"], outcomes[rid]
            assert all(reason in r["error_msg"] and r["error_code"] == 400 for r in ranks), outcomes[rid]
            assert reason in outcomes[rid]["dispatch_error"]
        assert [r["status"] for r in outcomes["good"]["ranks"]] == ["SUCCESS", "SUCCESS"]
        # A conflicting registration is refused.
        body = {"req_id": "x_local_part_0", "receive_count": 2, "receive_url": "127.0.0.1:1", "modality": "IMAGE"}
        post(f"{url}/scheduler_receive_url", body)
        with pytest.raises(urllib.error.HTTPError) as refused:
            post(f"{url}/scheduler_receive_url", {**body, "receive_count": 3})
        assert refused.value.code == 400
        pool.server.servicer.model.close()  # the pool's model gone: its answers fail
        down = scenario(sglang_python, {"encoder_urls": [url], "tp": 1, "requests": [
            {"rid": "pool-down", "images": [data_url(image_bytes(77, 55), "image/png")], "videos": []}]},
            tmp_path / "down")
        (outcome,) = down["requests"]
        assert outcome["ranks"][0]["status"] == "FAIL" and "encoder pool" in outcome["ranks"][0]["error_msg"]
    finally:
        stop(front)


def post(url: str, body: dict):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())
