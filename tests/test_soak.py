"""Soak at saturation against a real `encoder-service serve` process on loopback.

Mixed traffic from several client threads — valid requests (rows checked against an in-process
engine: nothing lost or misrouted), corrupt items, oversized requests, cancelled calls, deadlines
too short to meet, clients that vanish mid-call — while the server's memory (the transport and its
model/preprocessing processes), threads and file descriptors are sampled. The CI version runs 30 s;
the full one (5 minutes) is marked `soak` and run by hand:

    python -m pytest -m soak tests/test_soak.py
"""

from __future__ import annotations

import collections
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from encoder_service.client.endpoint import ENCODE_METHOD, EncoderClient
from encoder_service.client.security import ClientSecurity
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.contract.wire.channel import channel_options
from encoder_service.contract.wire.media import media_to_proto
from encoder_service.engine import EncoderEngine
from encoder_service.proto import encoder_pb2 as pb
from tests.conftest import image_bytes

RSS_CEILING_MB = 3000  # transport + model process + preprocessing workers, tiny model, 64 MB arenas and cache
MAX_REQUEST_MB = 4


def _tree_pids(root: int) -> list[int]:
    children = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children[ppid].append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _rss_mb(root: int) -> float:
    total = 0
    for pid in _tree_pids(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _threads_and_fds(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def soak(engine_config, seconds: float, clients: int = 4) -> dict:
    proc = subprocess.Popen(
        [sys.executable, "-m", "encoder_service.cli", "serve", "--port", "0", "--checkpoint", engine_config.checkpoint,
         "--preprocess-workers", "1", "--arena-mb", "64", "--output-arena-mb", "64", "--cache-mb", "64",
         "--max-request-mb", str(MAX_REQUEST_MB), "--max-tokens-per-batch", str(engine_config.max_tokens_per_batch),
         "--max-tokens-per-request", str(engine_config.max_tokens_per_request)],
        stdout=subprocess.PIPE, text=True)
    address = proc.stdout.readline().split()[-1]
    reference = EncoderEngine(engine_config)
    rng = np.random.default_rng()
    pool = [(f"img{i}", image_bytes(int(rng.integers(16, 700)), int(rng.integers(16, 500)), seed=i)) for i in range(12)]
    expected = {name: reference.encode([MediaInput(Modality.IMAGE, data)]).embeddings for name, data in pool}
    counts: collections.Counter = collections.Counter()
    problems: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def note(key: str, problem: str | None = None) -> None:
        with lock:
            counts[key] += 1
            if problem:
                problems.append(problem)

    def worker(seed: int) -> None:
        r = random.Random(seed)
        with EncoderClient(address, timeout=60, security=ClientSecurity()) as client:
            while time.monotonic() < stop:
                action = r.choice(["valid", "valid", "valid", "invalid", "oversized", "cancel", "deadline", "vanish"])
                chosen = r.sample(pool, r.randint(1, 4))
                items = [MediaInput(Modality.IMAGE, data, item_id=f"{name}-{r.random():.6f}") for name, data in chosen]
                try:
                    if action == "valid":
                        out = client.encode(items)
                        if [m.item_id for m in out.items] != [i.item_id for i in items]:
                            note("misrouted", f"ids {[m.item_id for m in out.items]}")
                        for (name, _), rows in zip(chosen, out.split()):
                            if not torch.allclose(rows, expected[name], rtol=1e-4, atol=1e-4):
                                note("wrong_rows", f"rows of {name} differ")
                        note("ok")
                    elif action == "invalid":
                        items.insert(r.randint(0, len(items)), MediaInput(Modality.IMAGE, os.urandom(200), item_id="bad"))
                        client.encode(items)
                        note("unexpected_ok", "a corrupt item was accepted")
                    elif action == "oversized":
                        client.encode([MediaInput(Modality.IMAGE, os.urandom((MAX_REQUEST_MB + 1) << 20))])
                        note("unexpected_ok", "an oversized request was accepted")
                    elif action == "cancel":
                        request = pb.EncodeRequest(items=[media_to_proto(i) for i in items])
                        encode = client.channel.unary_unary(ENCODE_METHOD,
                                                            request_serializer=pb.EncodeRequest.SerializeToString)
                        call = encode.future(request, timeout=60)
                        time.sleep(r.random() * 0.05)
                        call.cancel()
                        note("cancelled")
                    elif action == "deadline":
                        client.encode(items, timeout=0.002 + r.random() * 0.02)
                        note("ok_in_time")
                    else:  # a client that disappears mid-call: its own channel, closed under the call
                        channel = grpc.insecure_channel(address, options=channel_options())
                        call = channel.unary_unary(ENCODE_METHOD, request_serializer=pb.EncodeRequest.SerializeToString)
                        call.future(pb.EncodeRequest(items=[media_to_proto(i) for i in items]), timeout=60)
                        time.sleep(r.random() * 0.05)
                        channel.close()
                        note("vanished")
                except grpc.RpcError as e:
                    code = e.code()
                    allowed = {
                        "invalid": {grpc.StatusCode.INVALID_ARGUMENT},
                        "oversized": {grpc.StatusCode.RESOURCE_EXHAUSTED},
                        "deadline": {grpc.StatusCode.DEADLINE_EXCEEDED},
                    }.get(action, set()) | {grpc.StatusCode.UNAVAILABLE}  # admission control: retry later
                    if code not in allowed:
                        note("bad_status", f"{action}: {code.name} {e.details()}")
                    else:
                        note(f"{action}:{code.name}")

    try:
        with EncoderClient(address, timeout=60, security=ClientSecurity()) as client:
            client.wait_ready()
            client.encode([MediaInput(Modality.IMAGE, pool[0][1])])
        time.sleep(1.0)
        idle_rss, (threads0, fds0) = _rss_mb(proc.pid), _threads_and_fds(proc.pid)
        peak = idle_rss
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            peak = max(peak, _rss_mb(proc.pid))
            time.sleep(0.25)
        time.sleep(3.0)  # let cancelled work drain
        after_rss, (threads1, fds1) = _rss_mb(proc.pid), _threads_and_fds(proc.pid)
        with EncoderClient(address, timeout=60, security=ClientSecurity()) as client:  # still serving
            out = client.encode([MediaInput(Modality.IMAGE, pool[1][1])])
            assert torch.allclose(out.embeddings, expected[pool[1][0]], rtol=1e-4, atol=1e-4)
    finally:
        proc.terminate()
        exit_code = proc.wait(timeout=60)
    return {"counts": dict(counts), "problems": problems, "idle_rss_mb": idle_rss, "peak_rss_mb": peak,
            "after_rss_mb": after_rss, "threads": (threads0, threads1), "fds": (fds0, fds1), "exit_code": exit_code}


def _check(result: dict) -> None:
    print(result)
    assert not result["problems"], result["problems"][:5]
    assert result["counts"].get("ok", 0) > 10
    assert result["peak_rss_mb"] < RSS_CEILING_MB, result
    assert result["after_rss_mb"] < result["idle_rss_mb"] + 400, result  # back near idle
    # gRPC's own thread pool grows with load up to a multiple of the cores (12 -> 14 on 2 cores, 37 -> 84
    # on 16); a leak would add threads per call (thousands of calls here).
    assert result["threads"][1] <= result["threads"][0] + 8 + 4 * (os.cpu_count() or 1), result
    assert result["fds"][1] <= result["fds"][0] + 16, result
    assert result["exit_code"] == 0


def test_soak_30s(engine_config):
    _check(soak(engine_config, seconds=30))


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_soak_5min(engine_config):
    _check(soak(engine_config, seconds=300, clients=8))
