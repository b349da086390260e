"""The model in its own process behind the real gRPC server: responses through shared memory are
correct, bounded by the output arena, always given back, and the process's death is reported."""

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from encoder_service.client.endpoint import ENCODE_METHOD, EncoderClient
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.contract.wire.media import media_to_proto
from encoder_service.engine import EncoderEngine
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.serving.api.server import BackgroundServer, ServerConfig
from encoder_service.serving.host.pipeline import PipelineConfig
from tests.conftest import image_bytes


def _images(rng, n: int, low: int = 200, high: int = 500) -> list[MediaInput]:
    return [MediaInput(Modality.IMAGE, image_bytes(int(w), int(h))) for w, h in rng.integers(low, high, size=(n, 2))]


def _wait_until_returned(model, timeout_s: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = {k: v for k, v in model.stats().items() if k in ("outputs_in_use", "tiles_in_use")}
        if stats == {"outputs_in_use": 0, "tiles_in_use": 0} or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def test_shared_memory_is_given_back_after_successes_errors_deadlines_and_cancellations(engine_config):
    rng = np.random.default_rng()
    cfg = ServerConfig(port=0, engine=engine_config, pipeline=PipelineConfig(preprocess_workers=1))
    with BackgroundServer(cfg) as server, EncoderClient(server.address, timeout=60) as client:
        reference = EncoderEngine(engine_config)
        items = _images(rng, 3)
        torch.testing.assert_close(client.encode(items).embeddings, reference.encode(items).embeddings,
                                   rtol=1e-5, atol=1e-5)
        with pytest.raises(grpc.RpcError) as bad:
            client.encode([MediaInput(Modality.IMAGE, b"not an image")])
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as late:
            client.encode(_images(rng, 8), timeout=0.005)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        call = client.channel.unary_unary(ENCODE_METHOD, request_serializer=pb.EncodeRequest.SerializeToString)
        video = MediaInput(Modality.VIDEO, rng.integers(0, 256, (6, 48, 64, 3), dtype=np.uint8), pruning_rate=0.5)
        request = pb.EncodeRequest(items=[media_to_proto(i) for i in _images(rng, 8) + [video]])
        pending = [call.future(request, timeout=60) for _ in range(4)]
        time.sleep(0.05)
        for future in pending:
            future.cancel()
        assert _wait_until_returned(server.server.model) == {"outputs_in_use": 0, "tiles_in_use": 0}
        items = _images(rng, 2)  # and it still serves
        torch.testing.assert_close(client.encode(items).embeddings, reference.encode(items).embeddings,
                                   rtol=1e-5, atol=1e-5)
        assert server.counters.errors >= 1 and server.counters.encode_calls == 2


def test_a_full_output_arena_makes_requests_wait_and_a_response_larger_than_it_is_refused(engine_config):
    """1 MB of output arena holds ~2 of these 8-image responses: 8 concurrent callers all get their own
    rows (they waited for room), and one response that could never fit gets RESOURCE_EXHAUSTED."""
    rng = np.random.default_rng()
    # float32 rows on every device (bf16 on a GPU would halve the bytes this test sizes).
    engine_config = dataclasses.replace(engine_config, max_tokens_per_request=16384, dtype="float32")
    reference = EncoderEngine(engine_config)
    row_bytes = reference.info().hidden_size * 4
    cfg = ServerConfig(port=0, engine=engine_config, pipeline=PipelineConfig(preprocess_workers=2, output_arena_mb=1))
    requests = [_images(rng, 8, 400, 600) for _ in range(8)]
    barrier = threading.Barrier(len(requests))
    with BackgroundServer(cfg) as server, EncoderClient(server.address, timeout=120) as client:
        def call(items):
            barrier.wait()
            return client.encode(items)

        with ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(call, requests))
        assert sum(r.embeddings.numel() * 4 for r in results) > 2 * (1 << 20)  # more than the arena at once
        too_big = _images(rng, 40, 500, 501)
        with pytest.raises(grpc.RpcError) as refused:
            client.encode(too_big)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "output arena" in refused.value.details()
        assert sum(p.tokens for p in reference.plan(too_big)) * row_bytes > 1 << 20
        assert _wait_until_returned(server.server.model) == {"outputs_in_use": 0, "tiles_in_use": 0}
    for items, result in zip(requests, results):
        torch.testing.assert_close(result.embeddings, reference.encode(items).embeddings, rtol=1e-5, atol=1e-5)


def test_a_dead_model_process_means_unavailable_and_not_serving(engine_config):
    cfg = ServerConfig(port=0, engine=engine_config, pipeline=PipelineConfig(preprocess_workers=1))
    with BackgroundServer(cfg) as server, EncoderClient(server.address, timeout=30) as client:
        client.wait_ready()
        server.server.model.proc.kill()
        health = health_pb2_grpc.HealthStub(client.channel)
        deadline = time.monotonic() + 10
        while health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as gone:
            client.encode(_images(np.random.default_rng(), 1))
        assert gone.value.code() == grpc.StatusCode.UNAVAILABLE
