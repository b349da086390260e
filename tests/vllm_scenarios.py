"""Runs vLLM through a plan of steps inside the vLLM test environment (scripts/vllm_env.sh); the tests in
tests/test_vllm.py write the plan, run this with that environment's Python and check what it reports.

    .venv-vllm/bin/python tests/vllm_scenarios.py PLAN.json RESULT.json

The plan: {"model": DIR, "connector": null | {"role": "pool", "extra": {...}}, "binding_key_file": PATH,
"steps": [...]}. Steps:
  {"op": "pool_start", "checkpoint": DIR, "port": N, "nixl": false}   an encoder pool (standalone gRPC server) in
                                                       this process (nixl: rows by reference too)
  {"op": "pool_stop"}
  {"op": "connector_ready"}                            the connector reaches the pool (its own channel), up to 30 s
  {"op": "pool_upload", "images": [PNG...], "tenant": T}   the front end's part: the images into the pool's cache,
                                                           under the user's tenant (probe, cache-only upload)
  {"op": "generate", "prompts": [{"text": ..., "images": [PNG...], "uuids": U, "tenant": T}], "max_tokens": N}
      U: "bound" (what the front end sets: bindings under T), "none", or a list of strings (a user's own uuids)
  {"op": "encoder_outputs", "images": [PNG...], "path": FILE}   vLLM's own encoder output for each image
  {"op": "chat", "messages": [OpenAI messages], "max_tokens": N}  LLM.chat (the OpenAI server's prompt)
vLLM's engine and worker run in this process, so the vision encoder's calls are counted (each generate
step reports how many ran) and its outputs can be kept. Every step's outcome goes into RESULT.json,
also a failure.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: encoder calls counted

ENCODER_CALLS = [0]
ENCODER_OUTPUTS: list = []
CONNECTOR_ERRORS: list[str] = []  # what the connector said during a step


class _Collect(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        CONNECTOR_ERRORS.append(record.getMessage())  # what the connector said (fallbacks, refusals)


def watch_the_encoder() -> None:
    """Count vLLM's vision encoder calls and keep what they return (the model runs in this process)."""
    from vllm.model_executor.models.interns1 import InternS1ForConditionalGeneration

    original = InternS1ForConditionalGeneration.embed_multimodal

    def watched(self, **kwargs):
        ENCODER_CALLS[0] += 1
        outputs = original(self, **kwargs)
        ENCODER_OUTPUTS.extend(t.detach().float().cpu().clone() for t in outputs)
        return outputs

    InternS1ForConditionalGeneration.embed_multimodal = watched


def make_llm(plan: dict):
    from vllm import LLM

    from encoder_service.integrations.vllm.launch import consumer_config

    kwargs = {}
    connector = plan.get("connector")
    if connector:
        extra = {"binding_key_file": plan["binding_key_file"], **connector["extra"]}
        kwargs["ec_transfer_config"] = consumer_config(extra.pop("address"), **extra)
    return LLM(model=plan["model"], dtype="float32", max_model_len=2048, enforce_eager=True,
               distributed_executor_backend="uni", limit_mm_per_prompt={"image": 4, "video": 1},
               seed=0, **kwargs)


def binder(plan: dict):
    from encoder_service.integrations.vllm.binding import Binder

    return Binder.from_file(plan["binding_key_file"])


def generate(llm, plan: dict, step: dict) -> dict:
    from PIL import Image
    from vllm import SamplingParams

    from encoder_service.contract.media import Modality, media_digest
    from encoder_service.integrations.vllm.binding import Bound

    prompts = []
    for p in step["prompts"]:
        prompt = {"prompt": p["text"]}
        if p["images"]:
            prompt["multi_modal_data"] = {"image": [Image.open(path).convert("RGB") for path in p["images"]]}
            uuids = p.get("uuids", "none")
            if uuids == "bound":
                uuids = [binder(plan).bind(Bound(p.get("tenant", "public"), Modality.IMAGE,
                                                 media_digest(Path(path).read_bytes()))) for path in p["images"]]
            if isinstance(uuids, list):
                prompt["multi_modal_uuids"] = {"image": uuids}
        prompts.append(prompt)
    before, counted = ENCODER_CALLS[0], connector_totals(llm)
    del CONNECTOR_ERRORS[:]
    started = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(max_tokens=step.get("max_tokens", 8), temperature=0.0, ignore_eos=True))
    after = connector_totals(llm)
    return {"seconds": time.perf_counter() - started, "encoder_calls": ENCODER_CALLS[0] - before,
            "connector_errors": list(CONNECTOR_ERRORS),
            "connector": {k: v - counted.get(k, 0) for k, v in after.items() if v != counted.get(k, 0)},
            "outputs": [{"token_ids": list(o.outputs[0].token_ids), "finish_reason": o.outputs[0].finish_reason,
                         "prompt_tokens": len(o.prompt_token_ids or [])} for o in outputs]}


def connector_ready(llm, timeout_s: float = 30.0) -> dict:
    """Until the connector's own pool client answers (after a pool restarts, its channel reconnects)."""
    pool = llm.llm_engine.engine_core.engine_core.scheduler.get_ec_connector().scheduler.pool
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            pool.model_info()
            return {}
        except Exception:  # noqa: BLE001 - not yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def connector_totals(llm) -> dict:
    """The connector's counters since it started (its scheduler side runs in this process)."""
    connector = llm.llm_engine.engine_core.engine_core.scheduler.get_ec_connector()
    return dict(connector.scheduler.totals) if connector is not None else {}


def chat(llm, step: dict) -> dict:
    from vllm import SamplingParams

    (output,) = llm.chat(step["messages"], SamplingParams(max_tokens=step.get("max_tokens", 8), temperature=0.0,
                                                          ignore_eos=True))
    return {"token_ids": list(output.outputs[0].token_ids), "text": output.outputs[0].text}


def encoder_outputs(llm, step: dict) -> dict:
    """vLLM's own encoder output for each image alone (a one-token request each), saved by digest."""
    from PIL import Image
    from safetensors.torch import save_file
    from vllm import SamplingParams

    from encoder_service.contract.media import media_digest

    rows = {}
    for path in step["images"]:
        del ENCODER_OUTPUTS[:]
        digest = media_digest(Path(path).read_bytes())
        llm.generate({"prompt": "<IMG_CONTEXT>", "multi_modal_data": {"image": Image.open(path).convert("RGB")},
                      "multi_modal_uuids": {"image": [f"rows-of-{digest}"]}},  # an identifier no cache knows yet
                     SamplingParams(max_tokens=1))
        (output,) = ENCODER_OUTPUTS
        rows[digest] = output.reshape(-1, output.shape[-1]).contiguous()
    save_file(rows, step["path"])
    return {"items": len(rows)}


class Pool:
    """An encoder pool in this process (the standalone gRPC server), started and stopped by steps."""

    def __init__(self):
        self.server = None

    def start(self, checkpoint: str, port: int, nixl: bool = False) -> dict:
        from encoder_service.config import EngineConfig
        from encoder_service.serving.api.server import BackgroundServer, ServerConfig
        from encoder_service.serving.host.pipeline import PipelineConfig
        from encoder_service.transfer.nixl import NixlSettings

        cfg = ServerConfig(port=port, engine=EngineConfig(checkpoint=checkpoint, device="cpu", dtype="float32"),
                           pipeline=PipelineConfig(preprocess_workers=1, arena_mb=64, cache_mb=64),
                           nixl=NixlSettings(enabled=nixl, ucx_transports="cma,tcp,self"))
        self.server = BackgroundServer(cfg)
        return {"address": self.server.start()}

    def stop(self) -> dict:
        if self.server is not None:
            self.server.stop()
            self.server = None
        return {}

    def upload(self, images: list[str], tenant: str) -> dict:
        """The front end's part: the images into the pool's cache under the user's tenant, no rows back."""
        from encoder_service.client.pool import PoolClientConfig, PoolEncoderClient
        from encoder_service.contract.media import MediaInput, Modality

        pool = PoolEncoderClient(PoolClientConfig([self.server.address], application=""))
        try:
            items = pool.upload([MediaInput(Modality.IMAGE, Path(p).read_bytes()) for p in images], tenant)
        finally:
            pool.close()
        stats = self.server.server.model.stats()
        leases = self.server.server.servicer.answers.leases
        # Leases go back asynchronously (a NIXL notification): a second for any still on their way (they
        # would otherwise end only at their 30 s expiry).
        deadline = time.monotonic() + 1.0
        while leases and leases.stats.active and time.monotonic() < deadline:
            time.sleep(0.02)
        return {"leases_active": leases.stats.active if leases else 0, "digests": [i.digest for i in items],
                "token_counts": [i.token_count for i in items], "jobs_started": stats["jobs_started"]}


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    results: list[dict] = []
    pool = Pool()
    out = Path(sys.argv[2])
    try:
        watch_the_encoder()
        logging.getLogger("encoder_service.integrations.vllm.connector").addHandler(_Collect())
        logging.getLogger("encoder_service.integrations.vllm.connector").setLevel(logging.INFO)
        llm = None
        for step in plan["steps"]:
            op = step["op"]
            try:
                if op == "pool_start":
                    result = pool.start(step["checkpoint"], step["port"], step.get("nixl", False))
                elif op == "pool_stop":
                    result = pool.stop()
                elif op == "connector_ready":
                    result = connector_ready(llm)
                elif op == "pool_upload":
                    result = pool.upload(step["images"], step.get("tenant", "public"))
                elif op == "generate":
                    llm = llm or make_llm(plan)
                    result = generate(llm, plan, step)
                elif op == "chat":
                    llm = llm or make_llm(plan)
                    result = chat(llm, step)
                elif op == "encoder_outputs":
                    llm = llm or make_llm(plan)
                    result = encoder_outputs(llm, step)
                else:
                    raise ValueError(f"unknown step {op!r}")
            except Exception as e:  # reported; the plan decides whether that was expected
                result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            results.append({"op": op, **result})
            if "stats" in step and pool.server is not None:
                results[-1]["pool_stats"] = pool.server.server.model.stats()
    finally:
        pool.stop()
        out.write_text(json.dumps({"steps": results}, indent=1))
    os._exit(0)  # vLLM's background threads must not hold the exit


if __name__ == "__main__":
    main()
