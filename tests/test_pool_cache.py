"""The embedding cache of a replica, on a real pipeline and a real gRPC server: content keys computed by
the server, single-flight, probe then upload, fetch by digest, tenant isolation, eviction under budget."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from encoder_service.client.endpoint import EncoderClient, by_digest
from encoder_service.client.pool import PoolClientConfig, PoolEncoderClient
from encoder_service.client.security import ClientSecurity
from encoder_service.contract.errors import CacheMiss, InvalidInput
from encoder_service.contract.media import MediaDigest, MediaInput, Modality, VideoSampling, media_digest
from encoder_service.contract.wire.media import media_to_proto
from encoder_service.contract.wire.status import cache_misses_from_status
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.serving.api.server import BackgroundServer, ServerConfig
from encoder_service.serving.host.pipeline import EncodePipeline, PipelineConfig
from encoder_service.serving.host.rows import OUTPUTS
from tests.conftest import image_bytes
from tests.video_fixture import mp4_bytes

NO_SECURITY = ClientSecurity()


def _image(w: int, h: int) -> MediaInput:
    return MediaInput(Modality.IMAGE, image_bytes(w, h, seed=int(np.random.default_rng().integers(1 << 30))))


@pytest.fixture
def cached(engine):
    pipeline = EncodePipeline(engine, PipelineConfig(preprocess_workers=2, arena_mb=16, cache_mb=8))
    yield pipeline
    pipeline.close()


def test_a_hit_is_the_first_encode_bit_for_bit_and_runs_nothing(cached, engine):
    items = [_image(300, 200), _image(64, 64)]
    first = cached.encode(items).result(timeout=60)
    assert [i.cache_hit for i in first.items] == [False, False]
    inserts = cached.store.stats.inserts
    again = cached.encode(list(reversed(items))).result(timeout=60)  # same items, another request
    assert [i.cache_hit for i in again.items] == [True, True]
    assert again.extras["batches"] == 0 and again.extras["preprocess_ms"] == 0
    assert cached.store.stats.inserts == inserts  # nothing encoded
    assert torch.equal(again.split()[0], first.split()[1]) and torch.equal(again.split()[1], first.split()[0])
    torch.testing.assert_close(first.embeddings, engine.encode(items).embeddings, rtol=1e-5, atol=1e-5)
    assert [i.digest for i in first.items] == [media_digest(i.data) for i in items]


def test_options_are_part_of_the_key(cached):
    """Another pruning rate or another frame sampling of the same video is another entry."""
    frames = np.random.default_rng().integers(0, 256, (12, 48, 64, 3), dtype=np.uint8)
    video = MediaInput(Modality.VIDEO, mp4_bytes(frames, fps=4))
    runs = [dataclasses.replace(video, pruning_rate=q, sampling=VideoSampling(num_frames=n))
            for q, n in [(0.0, 4), (0.5, 4), (0.0, 6), (0.5, 4)]]
    outs = [cached.encode([item]).result(timeout=60) for item in runs]
    assert [o.items[0].cache_hit for o in outs] == [False, False, False, True]
    assert [o.token_counts[0] for o in outs] == [64, 32, 96, 32]
    assert torch.equal(outs[1].embeddings, outs[3].embeddings)
    assert outs[1].items[0].tokens_per_frame == outs[3].items[0].tokens_per_frame  # EVS's per-frame counts come with the rows


def test_identical_items_in_flight_are_encoded_once(engine):
    """Single-flight: 8 concurrent requests (and a duplicate inside one) for one new image: one job."""
    pipeline = EncodePipeline(engine, PipelineConfig(preprocess_workers=2, arena_mb=16, cache_mb=0, max_wait_ms=200))
    try:
        item = _image(640, 480)
        barrier = threading.Barrier(8)

        def call(_):
            barrier.wait()
            return pipeline.encode([item, item]).result(timeout=60)

        with ThreadPoolExecutor(8) as ex:
            outs = list(ex.map(call, range(8)))
        assert pipeline.store.stats.inserts == 0  # the cache is off: single-flight alone
        assert pipeline.jobs_started == 1
        assert pipeline.store.stats.joins == 14  # 7 requests x 2 items joined the one job
        assert sorted(sum(i.cache_hit for i in o.items) for o in outs) == [0] + [2] * 7
        reference = outs[0].embeddings
        assert all(torch.equal(o.embeddings, reference) for o in outs)
        assert pipeline.store.arenas[OUTPUTS].wait_idle(5)
    finally:
        pipeline.close()


def test_digest_only_items_hit_or_name_every_miss(cached):
    known, unknown = _image(200, 100), _image(90, 90)
    cached.encode([known]).result(timeout=60)
    hit = cached.encode([by_digest(known)]).result(timeout=60)
    assert hit.items[0].cache_hit and hit.items[0].digest == media_digest(known.data)
    with pytest.raises(CacheMiss) as miss:
        cached.encode([by_digest(unknown), by_digest(known), by_digest(_image(5, 5))])
    assert [i for i, _ in miss.value.missing] == [0, 2]
    with pytest.raises(InvalidInput, match="malformed media digest"):
        MediaDigest("sha256:" + "0" * 63)


def test_eviction_keeps_the_cache_within_its_budget(engine):
    pipeline = EncodePipeline(engine, PipelineConfig(preprocess_workers=1, arena_mb=16, cache_mb=1))
    try:
        first = _image(640, 480)  # 13 tiles x 16 rows x 64 wide: 53 KB in float32, 27 KB in bf16 (on a GPU)
        item_bytes = pipeline.encode([first]).result(timeout=60).embeddings.nbytes
        for _ in range(2 * pipeline.store.cache.size // item_bytes):  # twice what the cache holds
            pipeline.encode([_image(640, 480)]).result(timeout=60)
        stats = pipeline.store.stats
        assert stats.evictions > 0 and stats.bytes <= pipeline.store.cache.size
        assert pipeline.store.cache.bytes_in_use <= pipeline.store.cache.size
        again = pipeline.encode([first]).result(timeout=60)
        assert not again.items[0].cache_hit  # evicted: a miss, encoded again, never an error
    finally:
        pipeline.close()


# ---------------------------------------------------------------------------------- over gRPC


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text("# one per tenant\ntenant-a-secret\ntenant-b-secret\n")
    return path


@pytest.fixture(scope="module")
def cache_server(engine_config, tokens_file):
    cfg = ServerConfig(port=0, engine=engine_config, auth_token_file=str(tokens_file),
                       pipeline=PipelineConfig(preprocess_workers=2, arena_mb=16, cache_mb=16))
    with BackgroundServer(cfg) as server:
        yield server


def _client(server, token: str, probe: bool = False) -> EncoderClient:
    return EncoderClient(server.address, timeout=30, security=ClientSecurity(token=token), probe=probe)


def test_probe_then_upload_sends_a_repeat_turn_as_digests(cache_server):
    items = [_image(640, 480), _image(300, 300)]
    with _client(cache_server, "tenant-a-secret", probe=True) as client:
        calls = cache_server.counters.encode_calls
        first = client.encode(items)  # misses: probe, then the bytes
        assert [i.cache_hit for i in first.items] == [False, False]
        repeat = client.encode(items + [_image(50, 80)])  # a new one joins: only it is uploaded
        assert [i.cache_hit for i in repeat.items] == [True, True, False]
        assert torch.equal(repeat.embeddings[: first.embeddings.shape[0]], first.embeddings)
        assert cache_server.counters.encode_calls == calls + 2  # the failed probes are not successes
    probe = pb.EncodeRequest(items=[media_to_proto(by_digest(i)) for i in items])
    upload = pb.EncodeRequest(items=[media_to_proto(i) for i in items])
    assert probe.ByteSize() <= 0.01 * upload.ByteSize()


def test_fetch_by_digest_and_malformed_digests_over_grpc(cache_server):
    item = _image(128, 96)
    with _client(cache_server, "tenant-a-secret") as client:
        encoded = client.encode([item])
        fetched = client.encode([MediaInput(Modality.IMAGE, MediaDigest(encoded.items[0].digest))])
        assert torch.equal(fetched.embeddings, encoded.embeddings) and fetched.items[0].cache_hit
        with pytest.raises(grpc.RpcError) as miss:
            client.encode([by_digest(_image(10, 10)), by_digest(item)])
        assert miss.value.code() == grpc.StatusCode.NOT_FOUND
        assert cache_misses_from_status(miss.value) == [0]
        bad = pb.EncodeRequest(items=[pb.MediaItem(modality=pb.MODALITY_IMAGE, digest=pb.MediaDigest(sha256="md5:abc"))])
        with pytest.raises(grpc.RpcError) as malformed:
            client.stub.Encode(bad, timeout=30)
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed media digest" in malformed.value.details()
        assert client.encode([item]).items[0].cache_hit  # still serving


def test_a_claimed_content_hash_never_selects_rows(cache_server):
    """Two different images claiming one content_hash each get their own rows."""
    a, b = _image(64, 64), _image(64, 64)
    a, b = dataclasses.replace(a, content_hash="same"), dataclasses.replace(b, content_hash="same")
    with _client(cache_server, "tenant-a-secret") as client:
        ra, rb = client.encode([a]), client.encode([b])
        assert not rb.items[0].cache_hit and rb.items[0].content_hash == "same"
        assert not torch.equal(ra.embeddings, rb.embeddings)
        assert torch.equal(client.encode([b]).embeddings, rb.embeddings)


def test_tenants_do_not_see_each_others_entries(cache_server):
    item = _image(200, 150)
    with _client(cache_server, "tenant-a-secret") as a, _client(cache_server, "tenant-b-secret") as b:
        a.encode([item])
        assert a.encode([by_digest(item)]).items[0].cache_hit
        with pytest.raises(grpc.RpcError) as probe:
            b.encode([by_digest(item)])  # B cannot learn that A sent it
        assert probe.value.code() == grpc.StatusCode.NOT_FOUND
        assert not b.encode([item]).items[0].cache_hit  # B's own entry
    with EncoderClient(cache_server.address, timeout=30, security=ClientSecurity(token="nobody")) as stranger:
        with pytest.raises(grpc.RpcError) as refused:
            stranger.encode([item])
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


# ---------------------------------------------------------------------------------- routing, scaling


def test_the_hash_ring_spreads_keys_and_moves_few_when_a_replica_joins():
    from encoder_service.serving.api.serve.routing import HashRing

    keys = [media_digest(bytes([i, j])) for i in range(20) for j in range(50)]
    three = HashRing(["a", "b", "c"])
    owners = [three.owners(k)[0] for k in keys]
    assert all(sorted(three.owners(k)) == ["a", "b", "c"] for k in keys[:10])
    assert min(owners.count(m) for m in "abc") > 0.2 * len(keys)  # roughly even
    four = HashRing(["a", "b", "c", "d"])
    moved = [k for k, o in zip(keys, owners) if four.owners(k)[0] != o]
    assert all(four.owners(k)[0] == "d" for k in moved)  # only keys the new replica takes move
    assert len(moved) < 0.4 * len(keys)


def test_a_busy_owner_hands_its_keys_to_the_next_replica_on_the_ring():
    from encoder_service.serving.api.serve.routing import bounded_choice

    owners = ["a", "b", "c"]
    assert bounded_choice(owners, {"a": 3, "b": 0, "c": 0}, 1.25) == ["a", "b", "c"]  # under min_load
    assert bounded_choice(owners, {"a": 30, "b": 2, "c": 1}, 1.25) == ["b", "a", "c"]  # 30 >= ceil(1.25*34/3)
    assert bounded_choice(owners, {"a": 14, "b": 14, "c": 14}, 1.25) == ["a", "b", "c"]  # all equal: keep affinity


def test_the_autoscaling_policy_counts_vit_tokens_and_requests_queued_before_replicas():
    from encoder_service.serving.api.serve.autoscaling import desired_replicas

    assert desired_replicas(0, 65536, 0, 32) == 0  # idle: Serve's min_replicas applies
    assert desired_replicas(3 * 65536, 65536, 3, 32) == 3  # three replicas' worth of tiles
    assert desired_replicas(1000, 65536, 3, 32) < 1  # three thumbnails: one replica is plenty
    assert desired_replicas(1000, 65536, 96, 32) == 3  # 96 requests waiting at routers: grow anyway


def test_the_autoscaling_policy_never_shrinks_the_pool_on_a_replica_that_has_not_reported():
    """Serve's own context: a busy replica whose report is missing must not read as an idle one."""
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingContext

    from encoder_service.serving.api.serve.autoscaling import PENDING_TOKENS, EncoderLoadPolicy

    deployment = DeploymentID(name="EncoderDeployment", app_name="encoder")
    a, b = (ReplicaID(unique_id=name, deployment_id=deployment) for name in ("a", "b"))

    def context(reports: dict) -> AutoscalingContext:
        return AutoscalingContext(
            deployment_id=deployment, deployment_name="EncoderDeployment", app_name="encoder",
            current_num_replicas=2, target_num_replicas=2, running_replicas=[a, b], total_num_requests=4.0,
            total_queued_requests=0.0, aggregated_metrics={PENDING_TOKENS: reports}, raw_metrics={},
            capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state={},
            last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=None)

    policy = EncoderLoadPolicy(target_pending_tokens=1000)
    assert policy(context({a: 100.0, b: 100.0}))[0] < 1  # both idle-ish: Serve may shrink to min_replicas
    assert policy(context({a: 3000.0, b: 1000.0}))[0] == 4  # 4000 tokens pending: four replicas' worth
    desired, state = policy(context({a: 100.0}))  # b is silent
    assert desired == 2 and state["silent_replicas"] == 1
    assert policy(context({a: 5000.0}))[0] == 5  # silence never holds growth back


def test_a_tenant_header_is_a_namespace_inside_the_token_and_a_second_token_header_is_refused(cache_server):
    """A front end keeps its users apart with the `tenant` header: inside its token's namespace, never reaching
    another token's; a forged second `authorization` header is refused, whatever it holds."""
    item = _image(90, 70)
    with _client(cache_server, "tenant-a-secret") as a, _client(cache_server, "tenant-b-secret") as b:
        a.encode([item], metadata=(("tenant", "alice"),))
        assert a.encode([by_digest(item)], metadata=(("tenant", "alice"),)).items[0].cache_hit
        for other in [(a, (("tenant", "bob"),)), (a, ()), (b, (("tenant", "alice"),))]:
            with pytest.raises(grpc.RpcError) as miss:
                other[0].encode([by_digest(item)], metadata=other[1])
            assert miss.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as forged:
            b.encode([by_digest(item)], metadata=(("authorization", "Bearer tenant-a-secret"), ("tenant", "alice")))
        assert forged.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_cache_only_upload_sends_no_rows_and_the_item_is_fetched_by_digest(cache_server, engine):
    """ROWS_CACHE_ONLY: the item is encoded into the cache and the answer is its metadata alone (a front end
    that never uses the rows); a consumer with only the digest then fetches exactly the engine's rows."""
    items = [_image(320, 240), _image(64, 64)]
    pool = PoolEncoderClient(PoolClientConfig([cache_server.address], application=""),
                             security=ClientSecurity(token="tenant-a-secret"))
    try:
        uploaded = pool.upload(items, tenant="alice")
        assert [i.token_count for i in uploaded] == engine.encode(items).token_counts
        assert all(i.cached for i in uploaded) and [i.digest for i in uploaded] == [media_digest(i.data) for i in items]
        with _client(cache_server, "tenant-a-secret") as client:
            raw = client.encode(items, metadata=(("tenant", "alice"),), rows=pb.ROWS_CACHE_ONLY)
            assert raw.embeddings.shape == (0, engine.info().hidden_size) and all(i.cache_hit for i in raw.items)
        fetched = pool.encode([by_digest(i) for i in items], tenant="alice")
        torch.testing.assert_close(fetched.embeddings, engine.encode(items).embeddings, rtol=1e-5, atol=1e-5)
        assert pool.upload(items, tenant="alice")[0].cache_hit  # a repeat: a probe, nothing encoded
    finally:
        pool.close()


def test_a_cache_only_upload_to_a_server_without_a_cache_is_refused(engine_config):
    cfg = ServerConfig(port=0, engine=engine_config, pipeline=PipelineConfig(preprocess_workers=1, cache_mb=0))
    with BackgroundServer(cfg) as server, EncoderClient(server.address, security=ClientSecurity()) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.encode([_image(32, 32)], rows=pb.ROWS_CACHE_ONLY)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "cache" in refused.value.details()
        assert client.encode([_image(32, 32)]).token_counts == [16]
