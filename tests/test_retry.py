"""The one retry policy (`client/retry.py`) and the README's status table agree, row by row; real servers
send what the table says; the policy waits as servers ask and gives up where it should."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from encoder_service.client.endpoint import EncoderClient, RemoteCallError, by_digest
from encoder_service.client.pool import PoolClientConfig, PoolEncoderClient
from encoder_service.client.retry import PoisonMemory, RetryPolicy, is_retryable
from encoder_service.client.security import ClientSecurity
from encoder_service.contract.errors import (BudgetExceeded, Busy, CacheMiss, DeadlineExceeded, InvalidInput,
                                             PoisonInput, Unauthenticated, Unavailable)
from encoder_service.contract.media import MediaInput, Modality, media_digest
from encoder_service.contract.wire.status import as_failure, error_info, status_for, status_message
from encoder_service.serving.api.server import BackgroundServer, ServerConfig
from tests.conftest import gradient_png, image_bytes
from tests.faulty_proxy import Faults, FaultyProxy

README = Path(__file__).resolve().parents[1] / "README.md"


def _table() -> list[tuple[str, str, str]]:
    """(status, reason, retried) of each row of the README's status table."""
    lines = README.read_text().splitlines()
    start = lines.index("| status | reason (ErrorInfo) | when | retried |")
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        status, reason, _, retried = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append((status, reason, retried))
    return rows


def _sent(error: BaseException) -> RemoteCallError:
    """What a server sends for `error` (its status, message and details), as a client receives it."""
    return RemoteCallError(status_for(error), status_message(error), as_failure(error))


# One real failure (the server-side error a server maps) or transport-level status per row of the table.
EXAMPLES = {
    ("UNAVAILABLE", "BUSY"): lambda: _sent(Busy("busy", 200)),
    ("UNAVAILABLE", "UNAVAILABLE"): lambda: _sent(Unavailable("the encoder model process exited")),
    ("CANCELLED", ""): lambda: RemoteCallError(grpc.StatusCode.CANCELLED, "Cancelled on the server side"),
    ("DEADLINE_EXCEEDED", "DEADLINE"): lambda: _sent(DeadlineExceeded("deadline passed")),
    ("RESOURCE_EXHAUSTED", "REQUEST_TOO_LARGE"): lambda: _sent(BudgetExceeded("request needs 9999 tokens")),
    ("RESOURCE_EXHAUSTED", ""): None,  # two rows: gRPC's size limit and Serve's backpressure (below)
    ("NOT_FOUND", "CACHE_MISS"): lambda: _sent(CacheMiss([(0, "a")])),
    ("INVALID_ARGUMENT", "BAD_ITEM, BAD_REQUEST, POISON"): lambda: _sent(PoisonInput("crashes workers", 0)),
    ("INTERNAL", "INTERNAL"): lambda: _sent(RuntimeError("a bug")),
    ("INTERNAL", ""): lambda: RemoteCallError(grpc.StatusCode.INTERNAL, "The actor died unexpectedly before "
                                              "finishing this task."),
    ("UNKNOWN", ""): lambda: RemoteCallError(grpc.StatusCode.UNKNOWN, "Exception calling application"),
    ("UNAUTHENTICATED", "UNAUTHENTICATED"): lambda: _sent(Unauthenticated("missing or wrong bearer token")),
}
SIZE_LIMIT = RemoteCallError(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (70000000 vs. 67108864)")
BACKPRESSURE = RemoteCallError(grpc.StatusCode.RESOURCE_EXHAUSTED, "Request dropped due to backpressure")


@pytest.mark.parametrize("row", _table(), ids=lambda row: f"{row[0]}-{row[1] or 'none'}-{row[2][:3]}")
def test_the_policy_does_what_the_readme_table_says(row):
    status, reason, retried = row
    if (status, reason) == ("RESOURCE_EXHAUSTED", ""):
        error = BACKPRESSURE if retried.startswith("yes") else SIZE_LIMIT
    else:
        error = EXAMPLES[(status, reason)]()
    assert error.code().name == status
    info = error_info(error)
    assert (info.reason if info else "") in ([r.strip() for r in reason.split(",")] if reason else [""])
    assert is_retryable(error) == retried.startswith("yes"), row


def test_every_server_side_error_has_a_row():
    rows = {(status, reason) for status, reason, _ in _table()}
    reasons = {r.strip() for _, reason, _ in _table() for r in reason.split(",") if r.strip()}
    for error in [Busy("b", 1), Unavailable("u"), DeadlineExceeded("d"), BudgetExceeded("b"), CacheMiss([(0, "")]),
                  InvalidInput("i"), InvalidInput("i", 0), PoisonInput("p", 0), RuntimeError("x"), Unauthenticated("u")]:
        info = error_info(_sent(error))
        assert info.reason in reasons and any(s == status_for(error).name for s, _ in rows), error


@pytest.fixture(scope="module")
def busy_server(engine_config):
    cfg = ServerConfig(port=0, engine=engine_config, max_inflight_requests=1, retry_after_ms=300,
                       max_request_bytes=1 << 20)
    with BackgroundServer(cfg) as server:
        yield server


def test_a_real_server_sends_what_the_table_says(busy_server, engine_config):
    with EncoderClient(busy_server.address, timeout=60, security=ClientSecurity()) as client:
        def code_and_reason(items, **kwargs):
            with pytest.raises(grpc.RpcError) as failed:
                client.encode(items, **kwargs)
            info = error_info(failed.value)
            return failed.value.code().name, info.reason if info else "", is_retryable(failed.value)

        many = [MediaInput(Modality.IMAGE, gradient_png(1000, 1000, i)) for i in range(30)]  # over max_tokens_per_request
        assert code_and_reason(many) == ("RESOURCE_EXHAUSTED", "REQUEST_TOO_LARGE", False)
        assert code_and_reason([MediaInput(Modality.IMAGE, b"\x00" * (2 << 20))]) == ("RESOURCE_EXHAUSTED", "", False)
        assert code_and_reason([MediaInput(Modality.IMAGE, b"junk")]) == ("INVALID_ARGUMENT", "BAD_ITEM", False)
        missing = by_digest(MediaInput(Modality.IMAGE, image_bytes(30, 30)))
        assert code_and_reason([missing]) == ("NOT_FOUND", "CACHE_MISS", False)
        slow = [MediaInput(Modality.IMAGE, gradient_png(1600, 1000, i)) for i in range(8)]
        first = threading.Thread(target=client.encode, args=(slow,))
        first.start()
        try:
            for _ in range(300):
                time.sleep(0.01)
                try:
                    client.encode([MediaInput(Modality.IMAGE, image_bytes(16, 16))])
                except grpc.RpcError as e:
                    busy = e
                    break
            assert busy.code() == grpc.StatusCode.UNAVAILABLE and error_info(busy).reason == "BUSY"
            assert dict(busy.trailing_metadata())["retry-after-ms"] == "300" and is_retryable(busy)
        finally:
            first.join()


def test_the_policy_retries_after_the_servers_hint_and_stops_at_final_codes():
    calls = []

    def flaky(number: int, timeout_s: float) -> str:
        calls.append(time.monotonic())
        if number < 2:
            raise _sent(Busy("busy", 300))
        return "ok"

    policy = RetryPolicy(backoff_s=0.01, max_attempts=5)
    assert policy.run(flaky) == "ok" and len(calls) == 3
    assert all(b - a >= 0.29 for a, b in zip(calls, calls[1:]))  # the server's retry-after-ms, not the 10 ms backoff
    final = []
    with pytest.raises(grpc.RpcError):
        policy.run(lambda n, t: final.append(n) or (_ for _ in ()).throw(_sent(InvalidInput("bad", 0))))
    assert final == [0]
    deadline = RetryPolicy(backoff_s=0.2, total_timeout_s=0.5, max_attempts=50)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError):
        deadline.run(lambda n, t: (_ for _ in ()).throw(_sent(Unavailable("down"))))
    assert time.monotonic() - t0 < 1.0  # gives up within the call's total deadline


def test_poison_is_remembered_by_digest():
    memory = PoisonMemory(ttl_s=0.5)
    digests = [media_digest(b"fine"), media_digest(b"poison")]
    memory.learn(_sent(PoisonInput("crashes workers").for_item(1, "p")), digests)
    memory.learn(_sent(InvalidInput("bad").for_item(0, "f")), digests)  # bad input is not poison
    assert memory.poisoned(digests) == 1 and memory.poisoned(digests[:1]) is None
    time.sleep(0.6)
    assert memory.poisoned(digests) is None


@pytest.mark.parametrize("faults", [Faults(delay_s=0.02), Faults(reset=0.05), Faults(drop=0.03), Faults(reset=0.03, drop=0.02)],
                         ids=["delay", "reset", "drop", "reset+drop"])
def test_a_faulty_network_between_consumer_and_pool_loses_no_request_and_no_row(encoder_server, engine, faults):
    """Every request completes through a proxy that delays, resets and black-holes connections, each with the
    rows the engine gives, within the pool client's deadline."""
    rng = np.random.default_rng()
    images = [MediaInput(Modality.IMAGE, image_bytes(int(w), int(h), seed=int(rng.integers(1 << 30))))
              for w, h in rng.integers(40, 300, size=(6, 2))]
    expected = [engine.encode([image]).embeddings for image in images]
    proxy = FaultyProxy(encoder_server.address, faults, seed=int(rng.integers(1 << 30)))
    # A black-holed connection costs one attempt's timeout: short, so the test does not spend its time waiting
    # (an encode that merely takes longer on a loaded machine is tried again, which is what is under test).
    policy = RetryPolicy(attempt_timeout_s=1.5, total_timeout_s=40.0, max_attempts=16, backoff_s=0.05)
    pool = PoolEncoderClient(PoolClientConfig([proxy.address], application="", retry=policy))

    def injected() -> bool:
        return bool(faults.delay_s or proxy.counts["resets"] + proxy.counts["drops"])

    try:
        rounds = 0
        while rounds < 3 or (not injected() and rounds < 30):  # faults are random: go on until one came
            rounds += 1
            for image, rows in zip(images, expected):
                t0 = time.monotonic()
                result = pool.encode([image])
                assert time.monotonic() - t0 < policy.total_timeout_s
                torch.testing.assert_close(result.embeddings, rows, rtol=1e-5, atol=1e-5)
    finally:
        pool.close()
        proxy.close()
    assert injected(), "no fault was injected"
