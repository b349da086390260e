"""LLM workers as Ray actors: a reference LLM engine fed by the encoder pool over gRPC.

The actor's API takes and returns msgpack bytes (`llm_worker.codec`), so nothing
of ours is pickled between processes or nodes.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import ray

from encoder_service.client.pool import PoolClientConfig, PoolEncoderClient
from encoder_service.contract.settings import from_mapping
from llm_worker.codec import pack_outputs, unpack_requests
from llm_worker.engine import LLMEngine, LLMWorkerConfig


@ray.remote
class LLMWorkerActor:
    def __init__(self, pool: dict[str, Any], worker: dict[str, Any] | None = None):
        import torch

        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.encoder = PoolEncoderClient(from_mapping(PoolClientConfig, pool, "the LLM worker's pool config"))
        self.engine = LLMEngine(from_mapping(LLMWorkerConfig, worker, "the LLM worker's config"), self.encoder)

    def generate(self, payload: bytes) -> bytes:
        """msgpack list of requests in, msgpack list of outputs out."""
        return pack_outputs(self.engine.generate(unpack_requests(payload)))

    def stats(self) -> dict[str, Any]:
        return {
            "encode_calls": self.engine.encode_calls,
            "encoder_retries": self.encoder.retries,
            "cache": asdict(self.engine.cache.stats),
        }
