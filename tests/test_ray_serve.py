"""The encoder pool on a real local Ray cluster, reached through Ray Serve's gRPC proxy.

Replicas choose their resources explicitly (CPU replicas; fractional GPUs where the GPU is the
point), so the tests pass with 0, 1 or several GPUs on the machine.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from encoder_service.client.endpoint import EncoderClient, by_digest  # noqa: E402
from encoder_service.client.security import ClientSecurity  # noqa: E402
from encoder_service.client.pool import PoolClientConfig, PoolEncoderClient
from encoder_service.client.retry import RetryPolicy  # noqa: E402
from encoder_service.contract.media import MediaInput, Modality  # noqa: E402
from encoder_service.engine import EncoderEngine  # noqa: E402
from encoder_service.proto import encoder_pb2 as pb  # noqa: E402
from encoder_service.serving.api import services  # noqa: E402
from encoder_service.serving.api.serve.app import unplaceable_replicas
from encoder_service.serving.api.serve.local import deploy, free_port, load_serve_config, running_replicas
from llm_worker.actor import LLMWorkerActor  # noqa: E402
from llm_worker.codec import pack_requests, unpack_outputs  # noqa: E402
from llm_worker.engine import GenerationRequest, LLMEngine, LLMWorkerConfig  # noqa: E402
from llm_worker.tiny import tiny_llm_dir  # noqa: E402
from tests.conftest import image_bytes, pool_token, start_local_ray, wait_for  # noqa: E402

APP = "encoder"
METADATA = (("application", APP),)



TENANT = "tests"  # handle callers name their tenant (the pool requires auth)


@pytest.fixture(scope="module")
def ray_cluster(tiny_checkpoint):
    with pool_token():  # the replicas' token, and the one this module's gRPC clients send
        start_local_ray(6)
        yield free_port()  # Serve's gRPC proxy port: fixed once Serve starts, so one per cluster
        serve.shutdown()
        ray.shutdown()
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def cpu_engine(engine_config) -> EncoderEngine:
    """The in-process reference for CPU replicas (float32), whatever devices the machine has."""
    return EncoderEngine(dataclasses.replace(engine_config, device="cpu"))


def _config(tiny_checkpoint, port: int, gpus_per_replica: float = 0, cache_mb: int = 64, target_pending_tokens: int = 2000,
            **autoscaling) -> dict:
    """deploy/serve_config.yaml, with test-sized knobs: fast autoscaling, a batching window, and
    resources chosen explicitly (default: CPU replicas, so a GPU machine runs the same pool)."""
    cfg = copy.deepcopy(load_serve_config())
    cfg["grpc_options"]["port"] = port
    cfg["http_options"]["port"] = port + 1 if port < 65535 else port - 1
    app = cfg["applications"][0]
    app["args"]["gpus_per_replica"] = gpus_per_replica
    app["args"]["engine"].update(checkpoint=str(tiny_checkpoint), device="cuda" if gpus_per_replica else "cpu")
    app["args"]["pipeline"].update(max_wait_ms=30.0, preprocess_workers=1, arena_mb=32, cache_mb=cache_mb)
    scaling = app["deployments"][0]["autoscaling_config"]
    scaling.update({"metrics_interval_s": 0.2, "look_back_period_s": 1.0, "upscale_delay_s": 0.5, "downscale_delay_s": 2.0, **autoscaling})
    scaling["policy"]["policy_kwargs"]["target_pending_tokens"] = target_pending_tokens
    return cfg


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_checkpoint):
    """min 1, max 2 replicas; a replica per ~2000 pending ViT tokens (about one 600x450 image) as the target.
    Scaling down waits 8 s of low load: on CI's 2 cores a starting replica competes with the load for the
    CPU, and a shorter delay once gave up a scale-up in progress."""
    address = deploy(_config(tiny_checkpoint, ray_cluster, min_replicas=1, max_replicas=2, downscale_delay_s=8.0))
    with EncoderClient(address, timeout=60) as client:
        yield address, client


def _items(rng, n):
    sizes = [(int(w), int(h)) for w, h in rng.integers(20, 300, size=(n, 2))]
    return [MediaInput(Modality.IMAGE, image_bytes(w, h, "PNG", seed=int(rng.integers(1 << 30)))) for w, h in sizes]


def test_concurrent_calls_are_batched_and_each_equals_encoding_alone(pool, cpu_engine):
    _, client = pool
    rng = np.random.default_rng()
    requests = [_items(rng, int(rng.integers(1, 3))) for _ in range(12)]
    barrier = threading.Barrier(len(requests))

    def call(items):
        barrier.wait()  # all at once, so they queue together
        return client.encode(items, metadata=METADATA)

    with ThreadPoolExecutor(len(requests)) as ex:
        results = list(ex.map(call, requests))
    assert max(r.extras["batch_requests"] for r in results) > 1
    for items, result in zip(requests, results):
        alone = cpu_engine.encode(items)  # in-process, same checkpoint, nothing batched
        assert result.token_counts == alone.token_counts
        torch.testing.assert_close(result.embeddings, alone.embeddings, rtol=1e-5, atol=1e-5)


def test_bad_input_through_the_proxy_keeps_serving(pool):
    _, client = pool
    bad = pb.EncodeRequest(items=[pb.MediaItem(modality=pb.MODALITY_IMAGE, encoded_image=b"\x89PNG broken")])
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Encode(bad, metadata=METADATA, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "undecodable" in err.value.details()
    assert client.encode([MediaInput(Modality.IMAGE, image_bytes(64, 64))], metadata=METADATA).token_counts == [16]


def test_health_reflection_and_cli_through_the_proxy(pool, ray_cluster, tiny_checkpoint, tmp_path):
    """Clients meet the pool as they meet the standalone server: the standard health check (not serving
    before a replica is up, SERVING once one is, NOT_FOUND once the application is gone), its Watch,
    reflection, `wait_ready` and the CLI, all through Serve's gRPC proxy."""
    address, _ = pool
    probe = EncoderClient(address, timeout=30, application="probe")
    cfg = _config(tiny_checkpoint, ray_cluster, min_replicas=1, max_replicas=1)
    cfg["applications"][0].update(name="probe", route_prefix="/probe")
    deploying = threading.Thread(target=deploy, args=(cfg,))
    deploying.start()
    seen = []
    while not seen or seen[-1] != "SERVING":
        try:
            seen.append(probe.health(timeout=0.5))
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED,
                                grpc.StatusCode.UNAVAILABLE), e
            seen.append(e.code().name)
        assert len(seen) < 400, seen
    deploying.join()
    assert seen[0] != "SERVING" and seen[-1] == "SERVING", seen
    assert probe.wait_ready(timeout=10) == "health"

    health = health_pb2_grpc.HealthStub(probe.channel)
    meta = (("application", "probe"),)
    assert health.Check(health_pb2.HealthCheckRequest(service=services.ENCODER_SERVICE), metadata=meta).status == 1
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), metadata=meta)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(), metadata=meta, timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()

    reflection = reflection_pb2_grpc.ServerReflectionStub(probe.channel)
    listed = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                  metadata=meta, timeout=30))
    assert {s.name for s in listed.list_services_response.service} == set(services.REFLECTED_SERVICES)
    described = next(reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=services.ENCODER_SERVICE)]),
        metadata=meta, timeout=30))
    assert described.file_descriptor_response.file_descriptor_proto  # what grpcurl describe reads

    image = tmp_path / "cat.png"
    image.write_bytes(image_bytes(96, 64))
    cli = subprocess.run([sys.executable, "-m", "encoder_service.cli", "encode", str(image), "--address", address,
                          "--application", "probe", "--out", str(tmp_path / "rows.safetensors")],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "cat.png: tiles=" in cli.stdout and (tmp_path / "rows.safetensors").exists()
    assert "note:" not in cli.stderr  # readiness came from the health service, no fallback
    health_cli = [sys.executable, "-m", "encoder_service.cli", "health", "--address", address, "--application"]
    up = subprocess.run(health_cli + ["probe"], capture_output=True, text=True, timeout=60)
    assert (up.returncode, up.stdout.strip()) == (0, "SERVING"), up.stderr

    serve.delete("probe")
    with pytest.raises(grpc.RpcError) as err:
        probe.health()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(RuntimeError, match="not serving after"):
        probe.wait_ready(timeout=1)
    gone = subprocess.run(health_cli + ["probe"], capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1 and gone.stdout.startswith("NOT_FOUND")
    probe.close()


def test_every_door_of_the_pool_checks_tokens_and_keeps_tenants_apart(pool, ray_cluster, tiny_checkpoint, tmp_path):
    """A pool deployed with `auth_token_file`: through Serve's proxy a call without a token, with a wrong one
    or with a second forged header is refused (UNAUTHENTICATED); two tokens are two cache namespaces; health
    stays open; GetModelInfo says auth is on; a handle call must name its tenant."""
    tokens = tmp_path / "tokens"
    tokens.write_text("# one per tenant\ntoken-a\ntoken-b\n")
    cfg = _config(tiny_checkpoint, ray_cluster, min_replicas=1, max_replicas=1)
    cfg["applications"][0].update(name="authed", route_prefix="/authed")
    cfg["applications"][0]["args"]["auth_token_file"] = str(tokens)
    address = deploy(cfg)
    image = MediaInput(Modality.IMAGE, image_bytes(80, 60, seed=7))

    def refused(client, items, **kwargs) -> str:
        with pytest.raises(grpc.RpcError) as failed:
            client.encode(items, **kwargs)
        return failed.value.code().name

    def client(token):
        return EncoderClient(address, timeout=60, security=ClientSecurity(token=token), application="authed")

    try:
        with client(None) as anonymous, client("token-x") as wrong, client("token-a") as a, client("token-b") as b:
            assert refused(anonymous, [image]) == refused(wrong, [image]) == "UNAUTHENTICATED"
            with pytest.raises(grpc.RpcError) as info_refused:
                anonymous.model_info()
            assert info_refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert anonymous.health() == "SERVING"  # probes need no token
            first = a.encode([image])
            assert not first.items[0].cache_hit
            a_result_counts = first.token_counts
            info = a.model_info()
            assert info.auth_required and not info.shared_cache
            assert a.encode([by_digest(image)]).items[0].cache_hit  # a's own entry
            assert refused(b, [by_digest(image)]) == "NOT_FOUND"  # b cannot probe or fetch it
            forged = (("authorization", "Bearer token-b"),)
            assert refused(a, [by_digest(image)], metadata=forged) == "UNAUTHENTICATED"
        nameless = PoolEncoderClient(PoolClientConfig(application="authed", transport="handle"))
        named = PoolEncoderClient(PoolClientConfig(application="authed", transport="handle", tenant="llm-workers"))
        try:
            with pytest.raises(grpc.RpcError) as handle_refused:
                nameless.encode([image])
            assert handle_refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert named.encode([image]).token_counts == a_result_counts
        finally:
            nameless.close()
            named.close()
    finally:
        serve.delete("authed")


def test_handle_path_equals_grpc_zero_copy_and_maps_errors(pool):
    """Ray-native Encode: same rows as over gRPC, read in place from the object store, same statuses."""
    address, client = pool
    items = _items(np.random.default_rng(), 3)
    over_grpc = client.encode(items, metadata=METADATA)
    native = PoolEncoderClient(PoolClientConfig(application=APP, transport="handle", tenant=TENANT))
    over_handle = native.encode(items)
    assert over_handle.token_counts == over_grpc.token_counts
    assert torch.equal(over_handle.embeddings, over_grpc.embeddings)  # one request alone: the same batch
    assert native.model_info() == client.model_info(metadata=METADATA)

    # The tensor bytes arrive as a read-only array: a view of the object store, not a copy.
    request = pb.EncodeRequest(items=[pb.MediaItem(modality=pb.MODALITY_IMAGE, encoded_image=image_bytes(64, 64))])
    handle = native.transports[0].handle.options(method_name="encode_native")
    header, payload = handle.remote(request.SerializeToString(), 30.0, TENANT).result(timeout_s=60)
    assert isinstance(payload, np.ndarray) and not payload.flags.writeable
    assert pb.EncodeResponse.FromString(header).items[0].token_count == 16

    bad = [MediaInput(Modality.IMAGE, b"\x89PNG broken")]
    with pytest.raises(grpc.RpcError) as err:
        native.encode(bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "undecodable" in err.value.details()
    assert native.retries == 0  # the caller's fault: never retried
    assert native.encode(items[:1]).token_counts == over_grpc.token_counts[:1]
    native.close()


def test_encode_stream_through_the_proxy_and_the_handle(pool):
    """EncodeStream on both ways into the pool: the same rows as Encode, items announced as they are
    ready, a failing item ends the stream with Encode's status (and the pool keeps serving)."""
    _, client = pool
    rng = np.random.default_rng()
    items = _items(rng, 3) + [MediaInput(Modality.VIDEO, rng.integers(0, 256, (4, 40, 60, 3), dtype=np.uint8),
                                         pruning_rate=0.5)]
    unary = client.encode(items, metadata=METADATA)
    native = PoolEncoderClient(PoolClientConfig(application=APP, transport="handle", affinity=False, tenant=TENANT))
    try:
        for encode_stream in (lambda its, on_item: client.encode_stream(its, on_item, metadata=METADATA),
                              native.encode_stream):
            arrived = {}
            streamed = encode_stream(items, lambda i, item, rows, model: arrived.setdefault(i, rows.clone()))
            assert torch.equal(streamed.embeddings, unary.embeddings)
            assert streamed.token_counts == unary.token_counts and sorted(arrived) == [0, 1, 2, 3]
            assert all(torch.equal(arrived[i], rows) for i, rows in enumerate(streamed.split()))
            truncated = [items[0], MediaInput(Modality.IMAGE, image_bytes(80, 80, "PNG")[:60], item_id="broken")]
            with pytest.raises(grpc.RpcError) as err:
                encode_stream(truncated, lambda *event: None)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "item 1 ('broken')" in err.value.details()
        assert native.retries == 0
    finally:
        native.close()
    assert client.encode(items[:1], metadata=METADATA).token_counts == unary.token_counts[:1]


def _load(client, stop: threading.Event, results: list, errors: list):
    """Requests of 3 new 600x450 images each (new: the pool's cache must not answer them)."""
    rng = np.random.default_rng()
    deadline = time.monotonic() + 200  # bounded, whatever happens
    while not stop.is_set() and time.monotonic() < deadline:
        items = [MediaInput(Modality.IMAGE, image_bytes(600, 450, seed=int(rng.integers(1 << 30)))) for _ in range(3)]
        try:
            results.append(client.encode(items))
        except grpc.RpcError as e:  # pragma: no cover - reported by the assertions
            errors.append(e)


def test_sustained_load_scales_up_and_idle_scales_down(pool):
    address, _ = pool
    assert running_replicas(APP) == 1
    stop, results, errors = threading.Event(), [], []
    client = PoolEncoderClient(PoolClientConfig([address], APP))
    threads = [threading.Thread(target=_load, args=(client, stop, results, errors)) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        # A new replica is a new process that imports torch and loads the model: on CI's loaded 2 cores that
        # took over 60 s once (docs/reliability.md), hence the generous bound.
        scaled_up = wait_for(lambda: running_replicas(APP) == 2, timeout_s=150)
        # ... and the new replica takes a share of the traffic.
        both_serve = wait_for(lambda: len({r.extras["replica"] for r in results}) == 2, timeout_s=30)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert scaled_up, (f"pool did not scale to 2 replicas under load ({len(results)} requests served, "
                       f"{len(errors)} failed); Serve's view: {serve.status().applications[APP].deployments}")
    assert both_serve, "the second replica never served a request"
    assert not errors
    assert wait_for(lambda: running_replicas(APP) == 1, timeout_s=60), "pool did not scale down when idle"


def _replica_actor_names() -> list[str]:
    named = ray.util.list_named_actors(all_namespaces=True)
    return [a["name"] for a in named if a["namespace"] == "serve" and "EncoderDeployment" in a["name"]]


def test_killing_a_replica_mid_load_loses_no_request(ray_cluster, tiny_checkpoint):
    """Through the gRPC proxy, then through Serve handles (one deployment: Serve replaces the first victim)."""
    address = deploy(_config(tiny_checkpoint, ray_cluster, min_replicas=2, max_replicas=2))
    for transport in ("grpc", "handle"):
        assert wait_for(lambda: running_replicas(APP) == 2, timeout_s=60), "Serve did not replace the killed replica"
        client = PoolEncoderClient(
            PoolClientConfig([address], APP, transport=transport, tenant=TENANT,
                             retry=RetryPolicy(attempt_timeout_s=20, backoff_s=0.2, max_attempts=8))
        )
        stop, results, errors = threading.Event(), [], []
        threads = [threading.Thread(target=_load, args=(client, stop, results, errors)) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            assert wait_for(lambda: len(results) >= 8, timeout_s=60)
            victim = _replica_actor_names()[0]
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            done_at_kill = len(results)
            assert wait_for(lambda: len(results) >= done_at_kill + 30, timeout_s=90)
        finally:
            stop.set()
            for t in threads:
                t.join()
            client.close()
        assert not errors, (transport, [e.code() for e in errors], f"retries: {client.retries}")
        assert all(r.embeddings.shape[0] == sum(r.token_counts) for r in results)
        print(f"replica killed under load ({transport}): {len(results)} requests completed, {client.retries} retried")
    assert wait_for(lambda: running_replicas(APP) == 2, timeout_s=60), "Serve did not replace the killed replica"


def test_llm_worker_actor_generates_through_the_pool(ray_cluster, tiny_checkpoint, tmp_path_factory):
    """An LLM worker actor reaching the pool through the gRPC proxy, then through a Serve handle."""
    address = deploy(_config(tiny_checkpoint, ray_cluster, min_replicas=1, max_replicas=1))
    llm_dir = str(tiny_llm_dir(tmp_path_factory.mktemp("llm")))
    for seed, transport in enumerate(("grpc", "handle")):
        _generate_through_the_pool(address, llm_dir, transport, seed * 10)


def _generate_through_the_pool(address: str, llm_dir: str, transport: str, seed: int) -> None:
    """Fresh images per transport (`seed`): each run's first reference is a miss in the pool's cache."""
    requests = [
        GenerationRequest("Two pictures: <image> and <image>.", [
            MediaInput(Modality.IMAGE, image_bytes(120, 80, seed=seed + 1)),
            MediaInput(Modality.IMAGE, image_bytes(64, 64, seed=seed + 2)),
        ], max_new_tokens=5),
        GenerationRequest("Again <image>", [MediaInput(Modality.IMAGE, image_bytes(64, 64, seed=seed + 2))],
                          max_new_tokens=5),
    ]
    worker = LLMWorkerActor.options(num_cpus=1).remote(
        {"addresses": [address], "application": APP, "transport": transport, "tenant": TENANT},
        {"model_dir": llm_dir, "chunk_size": 16}
    )
    outputs = unpack_outputs(ray.get(worker.generate.remote(pack_requests(requests)), timeout=120))
    stats = ray.get(worker.stats.remote())
    assert stats["encode_calls"] == 1 and stats["cache"]["misses"] == 2  # 3 references, 2 distinct images

    # The same LLM in this process, one chunk, same pool: the tokens the actor must produce.
    local_pool = PoolEncoderClient(PoolClientConfig([address], APP))
    expected = LLMEngine(LLMWorkerConfig(model_dir=llm_dir, chunk_size=1000), local_pool).generate(requests)
    local_pool.close()
    assert [o.token_ids for o in outputs] == [o.token_ids for o in expected]
    assert outputs[0].media_tokens == [112, 16]  # 120x80 -> 3x2 tiles + thumbnail; 64x64 -> 1 tile
    assert all(len(o.token_ids) == 5 for o in outputs)
    ray.kill(worker)


def test_gpu_replicas_the_cluster_cannot_place_are_explained():
    assert unplaceable_replicas(4, 0, 0) is None  # CPU replicas
    assert unplaceable_replicas(2, 0.5, 1) is None  # two replicas share the one GPU
    assert unplaceable_replicas(2, 1, 2) is None
    message = unplaceable_replicas(4, 1, 1)
    assert "at most 1 replica(s) can run" in message and "4 replicas" in message
    assert "at most 2 replica(s)" in unplaceable_replicas(3, 0.5, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (two replicas share it at 0.5 each)")
def test_two_replicas_share_one_gpu_at_half_a_gpu_each(ray_cluster, tiny_checkpoint, engine_config):
    """Fractional GPUs: both replicas run on the same device, both serve, both give the engine's rows."""
    address = deploy(_config(tiny_checkpoint, ray_cluster, gpus_per_replica=0.5, min_replicas=2, max_replicas=2))
    assert wait_for(lambda: running_replicas(APP) == 2, timeout_s=120)
    reference = EncoderEngine(dataclasses.replace(engine_config, device="cuda"))
    items = _items(np.random.default_rng(), 2)
    want = reference.encode(items)
    seen = set()
    with EncoderClient(address, timeout=60) as client:
        assert client.model_info(metadata=METADATA).dtype == torch.bfloat16
        for _ in range(40):
            got = client.encode(items, metadata=METADATA)
            seen.add(got.extras["replica"])
            assert got.token_counts == want.token_counts
            err = (got.embeddings.float() - want.embeddings.float()).norm() / want.embeddings.float().norm()
            assert err.item() < 2e-2
            if len(seen) == 2:
                break
    assert len(seen) == 2, "both half-GPU replicas should serve"


def test_each_item_goes_to_the_replica_that_caches_it(ray_cluster, tiny_checkpoint):
    """Content affinity on a real 3-replica pool, through the gRPC proxy and through Serve handles: every
    repeat of an item lands on the replica that encoded it and is a cache hit there; the items spread over
    the replicas."""
    address = deploy(_config(tiny_checkpoint, ray_cluster, min_replicas=3, max_replicas=3))
    assert wait_for(lambda: running_replicas(APP) == 3, timeout_s=90)
    for transport in ("grpc", "handle"):
        _items_stay_home(address, transport)


def _items_stay_home(address: str, transport: str) -> None:
    """Fresh images for each transport: their first call is each one's miss."""
    client = PoolEncoderClient(PoolClientConfig([address], APP, transport=transport, tenant=TENANT))
    images = _items(np.random.default_rng(), 12)
    for image in images:  # a new handle's router learns the replicas over its first calls: warm it up
        client.encode([image])
    time.sleep(1.0)
    homes: dict[int, set] = {i: set() for i in range(len(images))}
    repeats = []
    for round_ in range(3):
        for i in range(len(images)):
            result = client.encode([images[i]])
            homes[i].add(result.extras["replica"])
            if round_:
                repeats.append(result.items[0].cache_hit)
    pair = client.encode([images[0], images[5]])  # a multi-item call: one call per item, each to its home
    client.close()
    assert all(len(h) == 1 for h in homes.values()), homes
    assert all(repeats)
    assert len(set().union(*homes.values())) >= 2  # the ring spreads items over replicas
    assert [p["replica"] for p in pair.extras["parts"]] == [next(iter(homes[0])), next(iter(homes[5]))]
    assert [i.cache_hit for i in pair.items] == [True, True]
