"""Rows by reference (NIXL): answers that say where their rows are, under a lease, read by the consumer
straight from the endpoint's memory; real servers, real NIXL agents (UCX) in separate processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from encoder_service.client.endpoint import EncoderClient
from encoder_service.contract.media import MediaInput, Modality, media_digest
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.serving.api.server import BackgroundServer, ServerConfig
from encoder_service.serving.host.pipeline import PipelineConfig
from encoder_service.transfer.nixl import NixlSettings, NixlUnavailable, load_api
from tests.conftest import image_bytes, pool_token, wait_for

ROOT = Path(__file__).resolve().parents[1]
UCX = "cma,tcp,self"  # same node: one copy out of the other process's memory


@pytest.fixture(scope="module", autouse=True)
def nixl():
    """NIXL here, UCX's same-node transports, and a bearer token (an endpoint hands out references only to
    callers that authenticate) for the servers started here and this process's clients."""
    try:
        load_api()
    except NixlUnavailable as e:
        pytest.skip(str(e))
    before = os.environ.get("UCX_TLS")
    os.environ["UCX_TLS"] = UCX
    with pool_token():
        yield
    if before is None:
        os.environ.pop("UCX_TLS", None)
    else:
        os.environ["UCX_TLS"] = before


def server(engine_config, cache_mb: int = 64, **nixl) -> BackgroundServer:
    settings = NixlSettings(**{"enabled": True, "ucx_transports": UCX, **nixl})
    return BackgroundServer(ServerConfig(port=0, metrics_port=0, engine=engine_config, nixl=settings,
                                         pipeline=PipelineConfig(preprocess_workers=1, arena_mb=32, cache_mb=cache_mb)))


def fresh_images(count: int) -> list[MediaInput]:
    rng = torch.Generator().manual_seed(int(time.time_ns() % (1 << 31)))
    sizes = torch.randint(48, 400, (count, 2), generator=rng).tolist()
    return [MediaInput(Modality.IMAGE, image_bytes(w, h)) for w, h in sizes]


def test_rows_by_reference_are_the_inline_rows_bit_for_bit_and_every_lease_comes_back(engine_config):
    items = fresh_images(5)
    with server(engine_config) as srv, EncoderClient(srv.address) as plain, \
            EncoderClient(srv.address, transfer="nixl") as nixl:
        inline = plain.encode(items)
        for _ in range(3):  # a miss, then hits: the cache's regions, read in place
            by_reference = nixl.encode(items)
            assert by_reference.reference is None and torch.equal(by_reference.embeddings, inline.embeddings)
            assert [i.token_count for i in by_reference.items] == [i.token_count for i in inline.items]
        one = nixl.encode(items[:1])
        assert torch.equal(one.embeddings, inline.embeddings[:inline.items[0].token_count])
        assert nixl.by_reference.reads == 4 and nixl.by_reference.fallbacks == 0
        leases = srv.server.servicer.answers.leases
        assert wait_for(lambda: leases.stats.active == 0, timeout_s=5), leases.stats
        assert leases.stats.granted == leases.stats.released == 4 and leases.stats.bytes == 0
        assert srv.server.model.stats()["outputs_in_use"] == 0
        with __import__("urllib.request").request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics") as r:
            text = r.read().decode()
        assert 'encoder_leases_total{outcome="released"} 4.0' in text and "encoder_leases_active 0.0" in text


def test_a_read_that_outlives_its_lease_is_refused_and_the_client_asks_again_inline(engine_config):
    """Cache off: a region goes back to the outputs arena when its lease ends, and the next answer reuses it.
    A reader that comes after that is told (LeaseExpired), never given the other answer's rows."""
    from encoder_service.transfer.reader import LeaseExpired, shared_reader

    first, second = fresh_images(2)
    with server(engine_config, cache_mb=0, lease_s=0.3) as srv, EncoderClient(srv.address) as plain, \
            EncoderClient(srv.address, transfer="nixl") as nixl:
        stale = plain.encode([first], rows=pb.ROWS_BY_REFERENCE)
        assert stale.reference is not None and stale.shape[0] == 0
        leases = srv.server.servicer.answers.leases
        assert wait_for(lambda: leases.stats.expired == 1, timeout_s=5)
        reused = plain.encode([second])  # its rows now where the first's were
        with pytest.raises(LeaseExpired):
            shared_reader().read(stale.reference, stale.dtype, stale.shape[1])
        # The client's own path: a reference whose read fails is asked again with rows inline.
        again = nixl.by_reference.resolve(stale, lambda: plain.encode([first]))
        assert torch.equal(again.embeddings, plain.encode([first]).embeddings)
        assert nixl.by_reference.fallbacks == 1 and reused.shape[0] > 0


def test_an_endpoint_without_nixl_or_over_the_tenant_budget_answers_inline(engine_config):
    items = fresh_images(2)
    off = BackgroundServer(ServerConfig(port=0, engine=engine_config,
                                        pipeline=PipelineConfig(preprocess_workers=1, arena_mb=32, cache_mb=32)))
    with off, EncoderClient(off.address) as plain, EncoderClient(off.address, transfer="nixl") as nixl:
        result = nixl.encode(items)
        assert torch.equal(result.embeddings, plain.encode(items).embeddings)
        assert off.server.servicer.answers.by_reference_inline == 1 and nixl.by_reference.reads == 0
    with server(engine_config, lease_mb_per_tenant=0) as srv, EncoderClient(srv.address, transfer="nixl") as nixl:
        result = nixl.encode(items)
        assert result.shape[0] == sum(i.token_count for i in result.items) > 0
        assert srv.server.servicer.answers.leases.stats.refused == 1 and nixl.by_reference.reads == 0


def _tree_rss_mb(root: int) -> float:
    pids, grew = {root}, True
    while grew:
        more = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) in pids:
                        more.add(int(entry))
                except (OSError, IndexError):
                    pass
        grew = bool(more - pids)
        pids |= more
    total = 0
    for pid in pids:
        try:
            total += next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total / 1024


def vanishing_consumers(engine_config, tmp_path: Path, consumers: int, processes: int, lease_s: float = 2.0) -> dict:
    """`consumers` consumers over `processes` processes (tests/rows_soak.py), one of them killed mid-run, a cache
    smaller than the images' rows (evictions while leases are out)."""
    images = fresh_images(40)
    with server(engine_config, cache_mb=1, lease_s=lease_s) as srv, EncoderClient(srv.address) as plain:
        expected = {media_digest(item.data): plain.encode([item]).embeddings for item in images}
        save_file(expected, tmp_path / "expected.safetensors")
        (tmp_path / "images").mkdir()
        for i, item in enumerate(images):
            (tmp_path / "images" / f"{i:03d}.png").write_bytes(item.data)
        rss_before = _tree_rss_mb(os.getpid())
        env = {**os.environ, "PYTHONPATH": str(ROOT), "UCX_TLS": UCX}
        outs = [tmp_path / f"out{i}.json" for i in range(processes)]
        procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "rows_soak.py"), srv.address,
                                   str(tmp_path / "images"), str(tmp_path / "expected.safetensors"),
                                   str(consumers // processes), str(lease_s),
                                   str(out)], env=env, stderr=open(tmp_path / f"err{i}.txt", "w"))
                 for i, out in enumerate(outs)]
        assert wait_for(lambda: outs[0].exists() and json.loads(outs[0].read_text() or "{}").get("read_ok", 0) >= 10,
                        timeout_s=120)
        procs[0].send_signal(signal.SIGKILL)  # a consumer process gone mid-run (reads in flight, leases held)
        for proc in procs[1:]:
            assert proc.wait(timeout=1800) == 0, (tmp_path / "err1.txt").read_text()[-2000:]
        procs[0].wait()
        leases = srv.server.servicer.answers.leases
        assert wait_for(lambda: leases.stats.active == 0, timeout_s=lease_s + 5), leases.stats
        counts: dict[str, int] = {}
        for out in outs:
            for key, value in json.loads(out.read_text() or "{}").items():
                counts[key] = counts.get(key, 0) + value
        return {"counts": counts, "leases": leases.stats, "outputs_in_use": srv.server.model.stats()["outputs_in_use"],
                "rss_before_mb": rss_before, "rss_after_mb": _tree_rss_mb(os.getpid()),
                "errors": (tmp_path / "err1.txt").read_text()[-2000:]}


def _check_soak(result: dict, consumers: int) -> None:
    counts, leases = result["counts"], result["leases"]
    assert counts["wrong_rows"] == 0 and counts["late_given_rows"] == 0 and counts["errors"] == 0, result
    assert counts["read_ok"] > 0 and counts["vanished"] > 0 and counts["late_detected"] > 0, result
    assert sum(counts.values()) >= consumers * 0.6, result  # the killed process's share may be missing
    assert leases.active == 0 and leases.bytes == 0 and result["outputs_in_use"] == 0, result
    assert leases.expired >= counts["vanished"], result  # nobody released them: they ended at their expiry
    assert result["rss_after_mb"] < result["rss_before_mb"] + 300, result


def test_consumers_that_vanish_mid_lease_leave_nothing_held(engine_config, tmp_path):
    _check_soak(vanishing_consumers(engine_config, tmp_path, consumers=600, processes=3), 600)


@pytest.mark.soak
def test_ten_thousand_consumers_a_third_vanishing(engine_config, tmp_path):
    result = vanishing_consumers(engine_config, tmp_path, consumers=10_000, processes=4)
    print(json.dumps({**result, "leases": vars(result["leases"])}, default=str))
    _check_soak(result, 10_000)


def test_a_serve_pool_hands_rows_out_by_reference_through_its_proxy_and_its_handle(engine_config):
    """Both doors of a Ray Serve replica (the gRPC proxy, the Serve handle), with auth: rows by reference are
    the inline rows; the replica's leases all come back."""
    import ray
    from ray import serve

    from encoder_service.client.pool import PoolClientConfig, PoolEncoderClient
    from encoder_service.serving.api.serve.local import cpu_pool_config, deploy
    from tests.conftest import start_local_ray

    items = fresh_images(3)
    start_local_ray(4)  # with the module's token: the replicas and this process's clients share it
    try:
        cfg = cpu_pool_config(engine_config.checkpoint, replicas=1)
        cfg["applications"][0]["args"]["nixl"] = {"enabled": True, "ucx_transports": UCX}
        address = deploy(cfg)
        grpc_plain = PoolEncoderClient(PoolClientConfig([address]))
        grpc_nixl = PoolEncoderClient(PoolClientConfig([address], transfer="nixl"))
        handle_nixl = PoolEncoderClient(PoolClientConfig(transport="handle", tenant="t1", transfer="nixl"))
        try:
            inline = grpc_plain.encode(items)
            for client in (grpc_nixl, handle_nixl):
                result = client.encode(items)
                assert torch.equal(result.embeddings, inline.embeddings)
                assert client.by_reference.reads == len(items) and client.by_reference.fallbacks == 0
            stats = handle_nixl.transports[0].handle.options(method_name="replica_stats").remote().result()
            assert wait_for(lambda: handle_nixl.transports[0].handle.options(method_name="replica_stats")
                            .remote().result()["leases_active"] == 0, timeout_s=10), stats
            assert stats["leases_granted"] == 2 * len(items)
        finally:
            for client in (grpc_plain, grpc_nixl, handle_nixl):
                client.close()
    finally:
        serve.shutdown()
        ray.shutdown()
