"""Node failure on a real multi-node Ray cluster (three raylets on loopback, `ray.cluster_utils.Cluster`).

Replicas run on the two worker nodes (one each: a custom resource only they have); clients reach the
pool through the head node's gRPC proxy with affinity and probing on. One worker node is killed
under load: no request is lost (clients retry on the survivor), no row is wrong, the dead node's
cache is simply gone (its items miss and are encoded again), and once a node joins again the pool
is back to its size.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from encoder_service.client.pool import PoolClientConfig, PoolEncoderClient
from encoder_service.client.retry import RetryPolicy  # noqa: E402
from encoder_service.contract.media import MediaInput, Modality  # noqa: E402
from encoder_service.engine import EncoderEngine  # noqa: E402
from encoder_service.serving.api.serve.local import deploy, free_port, load_serve_config, running_replicas  # noqa: E402
from tests.conftest import image_bytes, pool_token, start_ray_cluster, wait_for  # noqa: E402

APP = "encoder"
SLOT = {"encoder_slot": 1}  # only worker nodes have it: replicas never land on the head


@pytest.fixture(scope="module")
def cluster():
    with pool_token():  # the nodes' replicas accept it, this module's clients send it
        c, workers = start_ray_cluster(workers=2, worker_cpus=2, worker_resources=SLOT)
        yield c, workers
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


def test_a_node_killed_under_load_loses_no_request_and_no_row_is_wrong(cluster, tiny_checkpoint, engine_config):
    c, workers = cluster
    cfg = copy.deepcopy(load_serve_config())
    port = free_port()
    cfg["grpc_options"]["port"], cfg["http_options"]["port"] = port, free_port()
    app = cfg["applications"][0]
    app["args"].update(gpus_per_replica=0, resources_per_replica=SLOT)
    app["args"]["engine"].update(checkpoint=str(tiny_checkpoint), device="cpu")
    app["args"]["pipeline"].update(preprocess_workers=1, arena_mb=32, cache_mb=32)
    app["deployments"][0]["autoscaling_config"].update(min_replicas=2, max_replicas=2)
    address = deploy(cfg)
    assert wait_for(lambda: running_replicas(APP) == 2, timeout_s=120)

    reference = EncoderEngine(dataclasses.replace(engine_config, device="cpu"))
    rng = np.random.default_rng()
    images = [MediaInput(Modality.IMAGE, image_bytes(int(w), int(h), seed=int(rng.integers(1 << 30))))
              for w, h in rng.integers(40, 400, size=(16, 2))]
    expected = [reference.encode([image]).embeddings for image in images]
    retry = RetryPolicy(attempt_timeout_s=20, backoff_s=0.2, max_attempts=8)
    client = PoolEncoderClient(PoolClientConfig([address], APP, retry=retry))
    stop, done, wrong, errors, hits = threading.Event(), [], [], [], []

    def load(seed: int) -> None:
        pick = np.random.default_rng(seed)
        deadline = time.monotonic() + 150
        while not stop.is_set() and time.monotonic() < deadline:
            i = int(pick.integers(len(images)))
            try:
                result = client.encode([images[i]])
            except Exception as e:  # noqa: BLE001 - counted, asserted below
                errors.append(e)
                continue
            done.append(i)
            hits.append(result.items[0].cache_hit)
            if not torch.allclose(result.embeddings, expected[i], rtol=1e-5, atol=1e-5):
                wrong.append(i)

    threads = [threading.Thread(target=load, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: len(done) >= 40, timeout_s=90)
        c.remove_node(workers[0], allow_graceful=False)  # a node failure: raylet and replica gone at once
        at_kill = len(done)
        assert wait_for(lambda: len(done) >= at_kill + 40, timeout_s=120)
        workers.append(c.add_node(num_cpus=2, resources=SLOT))  # a replacement node joins
        assert wait_for(lambda: running_replicas(APP) == 2, timeout_s=120), "the pool did not return to its size"
        at_rejoin = len(done)
        assert wait_for(lambda: len(done) >= at_rejoin + 20, timeout_s=90)
    finally:
        stop.set()
        for t in threads:
            t.join()
        client.close()
    assert not errors, [str(e) for e in errors[:3]]
    assert not wrong
    assert any(hits) and not all(hits)  # cached repeats, and misses where a cache was lost
    print(f"node killed under load: {len(done)} requests, {client.retries} retried, "
          f"{sum(hits)} cache hits, 0 lost, 0 wrong")
