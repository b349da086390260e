"""A real grpc.aio server on loopback: batch encode, splitting by counts, errors, health, limits."""

import asyncio

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from encoder_service.client.endpoint import EncoderClient
from encoder_service.config import EngineConfig, tiny_encoder_config
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.models import save_checkpoint
from encoder_service.models.checkpoint import random_encoder
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.serving.api.server import BackgroundServer, ServerConfig
from tests.conftest import image_bytes


@pytest.fixture(scope="module")
def client(encoder_server):
    with EncoderClient(encoder_server.address, timeout=30) as c:
        c.wait_ready()
        yield c


def _mixed_items():
    rng = np.random.default_rng()
    return [
        MediaInput(Modality.IMAGE, image_bytes(321, 123, "PNG"), item_id="png"),
        MediaInput(Modality.IMAGE, image_bytes(64, 200, "WEBP"), item_id="webp"),
        MediaInput(Modality.IMAGE, image_bytes(500, 500, "JPEG"), item_id="jpeg"),
        MediaInput(Modality.IMAGE, rng.integers(0, 256, (77, 33, 3), dtype=np.uint8), item_id="raw"),
        MediaInput(Modality.VIDEO, rng.integers(0, 256, (3, 50, 80, 3), dtype=np.uint8), item_id="clip"),
    ]


def test_batch_split_by_counts_equals_each_item_alone(client):
    items = _mixed_items()
    batch = client.encode(items, request_id="req-1")
    assert batch.request_id == "req-1"
    assert [i.item_id for i in batch.items] == [i.item_id for i in items]
    assert batch.embeddings.shape[0] == sum(batch.token_counts)
    assert [i.offset for i in batch.items] == np.cumsum([0] + batch.token_counts[:-1]).tolist()
    assert batch.items[-1].tokens_per_frame == [16, 16, 16]
    for item, part in zip(items, batch.split()):
        alone = client.encode([item]).embeddings
        torch.testing.assert_close(part, alone, rtol=1e-5, atol=1e-5)


def test_model_info_and_health(client, encoder_server):
    info = client.model_info()
    assert info.hidden_size == tiny_encoder_config().output_size
    assert info.tiling.tokens_per_tile == 16 and info.tiling.max_tiles == 12
    assert info.max_tokens_per_batch == 1024
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "encoder_service.v1.EncoderService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING


def test_wait_ready_falls_back_to_model_info_without_the_health_service(encoder_server):
    """An endpoint that routes the encoder API but not grpc.health.v1 (as a Serve proxy whose config lists
    only the encoder servicer): `wait_ready` checks readiness with GetModelInfo and says so."""

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((encoder_server.server.servicer.handler(),))  # the real servicer, no health
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    loop = encoder_server._loop
    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    try:
        with EncoderClient(f"127.0.0.1:{port}", timeout=30) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.health()
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert c.wait_ready(timeout=10) == "model-info"
            assert c.encode([MediaInput(Modality.IMAGE, image_bytes(64, 64))]).token_counts == [16]
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=30)


def test_wait_ready_names_what_is_not_ready():
    """Nothing listening: FutureTimeoutError (the CLI's "no encoder server answering")."""
    from encoder_service.serving.api.serve.local import free_port

    with EncoderClient(f"127.0.0.1:{free_port()}", timeout=5) as c, pytest.raises(grpc.FutureTimeoutError):
        c.wait_ready(timeout=0.5)


def _raw_request(*items: pb.MediaItem) -> pb.EncodeRequest:
    return pb.EncodeRequest(request_id="bad", items=list(items))


BAD_REQUESTS = {
    "corrupt image": (
        _raw_request(pb.MediaItem(modality=pb.MODALITY_IMAGE, encoded_image=image_bytes(80, 80, "PNG")[:60])),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "garbage bytes": (
        _raw_request(pb.MediaItem(modality=pb.MODALITY_IMAGE, encoded_image=b"\x00garbage" * 10)),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "zero-size raw": (
        _raw_request(
            pb.MediaItem(modality=pb.MODALITY_IMAGE, raw_pixels=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[0, 5, 3]))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "empty bytes": (
        _raw_request(pb.MediaItem(modality=pb.MODALITY_IMAGE, encoded_image=b"")),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "raw size mismatch": (
        _raw_request(
            pb.MediaItem(
                modality=pb.MODALITY_IMAGE, raw_pixels=pb.Tensor(data=b"\x01" * 10, dtype=pb.DTYPE_UINT8, shape=[4, 4, 3])
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "unknown modality": (
        _raw_request(pb.MediaItem(modality=7, encoded_image=image_bytes(32, 32))),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "unspecified modality": (
        _raw_request(pb.MediaItem(encoded_image=image_bytes(32, 32))),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "no items": (_raw_request(), grpc.StatusCode.INVALID_ARGUMENT),
    "too many items": (
        _raw_request(*[pb.MediaItem(modality=pb.MODALITY_IMAGE, encoded_image=image_bytes(8, 8))] * 65),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "over the token budget": (
        _raw_request(*[pb.MediaItem(modality=pb.MODALITY_IMAGE, encoded_image=image_bytes(400, 300))] * 30),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_status_and_server_keeps_serving(client, case):
    request, code = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Encode(request, timeout=30)
    assert err.value.code() == code, err.value.details()
    assert err.value.details()  # a message a person can act on
    ok = client.encode([MediaInput(Modality.IMAGE, image_bytes(40, 30))])
    assert ok.embeddings.shape[0] == ok.token_counts[0] > 0


def test_expired_deadline_is_reported_and_server_keeps_serving(client):
    items = [MediaInput(Modality.IMAGE, image_bytes(600, 400))] * 8
    with pytest.raises(grpc.RpcError) as err:
        client.encode(items, timeout=0.001)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.encode(items[:1]).embeddings.shape[0] > 0


def test_response_larger_than_4mb(tmp_path):
    """A wide projector makes one response ~9 MB: limits are raised deliberately on both sides."""
    cfg = tiny_encoder_config()
    wide = type(cfg)(cfg.name, cfg.vision, type(cfg.projector)(2, 128, 4096), cfg.processor)
    path = save_checkpoint(random_encoder(wide), tmp_path / "wide")
    engine_cfg = EngineConfig(checkpoint=str(path), max_tokens_per_request=1 << 20)
    with BackgroundServer(ServerConfig(port=0, engine=engine_cfg)) as server, EncoderClient(server.address) as c:
        items = [MediaInput(Modality.IMAGE, image_bytes(640, 480))] * 3
        result = c.encode(items)
        assert result.embeddings.numel() * 4 > 8 * 1024 * 1024
        assert result.embeddings.shape == (3 * 13 * 16, 4096)


def test_reflection_lists_the_service(encoder_server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(encoder_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert "encoder_service.v1.EncoderService" in names


def test_standalone_server_batches_concurrent_requests(engine_config):
    """Concurrent Encodes share one ragged batch; each caller still gets exactly its own rows."""
    import dataclasses
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from encoder_service.engine import EncoderEngine
    from encoder_service.serving.host.pipeline import PipelineConfig

    engine_config = dataclasses.replace(engine_config, max_tokens_per_batch=16384)  # room for several requests
    cfg = ServerConfig(port=0, engine=engine_config, pipeline=PipelineConfig(max_wait_ms=50))
    rng = np.random.default_rng()
    requests = [
        [MediaInput(Modality.IMAGE, image_bytes(int(w), int(h))) for w, h in rng.integers(16, 200, size=(2, 2))]
        for _ in range(8)
    ]
    barrier = threading.Barrier(len(requests))
    with BackgroundServer(cfg) as server, EncoderClient(server.address) as c:
        def call(items):
            barrier.wait()
            return c.encode(items)

        with ThreadPoolExecutor(len(requests)) as ex:
            results = list(ex.map(call, requests))
    assert max(r.extras["batch_requests"] for r in results) > 1
    reference = EncoderEngine(engine_config)
    for items, result in zip(requests, results):
        torch.testing.assert_close(result.embeddings, reference.encode(items).embeddings, rtol=1e-5, atol=1e-5)
