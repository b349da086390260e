"""Drain under the signals process managers send: SIGTERM to the server alone, and SIGTERM or SIGINT to its
whole process group (Ctrl-C, `kill -- -PGID`, systemd's KillMode=control-group). The call in flight
completes, later calls are refused (UNAVAILABLE), the server exits 0: its model process and
preprocessing workers run in sessions of their own and ignore the signal, so only the server drains.

On failure each test reports what it has: the server's exit code and stderr (faulthandler on, so a crash
leaves its stack), and the gRPC debug string of the failed call."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from encoder_service.client.endpoint import EncoderClient
from encoder_service.client.security import ClientSecurity
from encoder_service.contract.media import MediaInput, Modality
from tests.conftest import gradient_png, wait_for


def _serve(log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`encoder-service serve` as a process manager starts it: the leader of a process group of its own."""
    proc = subprocess.Popen([sys.executable, "-m", "encoder_service.cli", "serve", "--port", "0",
                             "--preprocess-workers", "1", *extra], stdout=subprocess.PIPE, stderr=log.open("w"),
                            text=True, start_new_session=True, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    line = proc.stdout.readline()
    assert "listening" in line, f"{line!r}; server log:\n{log.read_text()[-3000:]}"
    return proc, line.split()[-1]


def _inflight_requests(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("encoder_inflight_requests "))


def _evidence(proc: subprocess.Popen, log: Path, error: BaseException | None) -> str:
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        code = "still running after 60 s"
    debug = error.debug_error_string() if isinstance(error, grpc.Call) else repr(error)
    return f"server exit code {code}; client error: {debug}\nserver stderr:\n{log.read_text()[-6000:]}"


@pytest.mark.parametrize("sig, to_group", [(signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGINT, True)],
                         ids=["sigterm-server", "sigterm-group", "sigint-group"])
def test_a_signal_drains_the_call_in_flight_and_refuses_new_ones(tmp_path, sig, to_group):
    log = tmp_path / "server.log"
    # Port 0: the server picks its metrics port (a port picked here could be taken before the server binds it).
    proc, address = _serve(log, "--drain-grace-s", "60", "--metrics-port", "0")
    metrics_port = int(proc.stdout.readline().rsplit(":", 1)[1].split("/")[0])
    try:
        # Small on the wire, slow to decode and tile: in the server when the signal comes.
        items = [MediaInput(Modality.IMAGE, gradient_png(1920, 1080, i), item_id=str(i)) for i in range(16)]
        with EncoderClient(address, timeout=120, security=ClientSecurity()) as client:
            client.wait_ready()
            client.encode(items[:1])  # warm
            outcome: dict = {}

            def call() -> None:
                try:
                    outcome["result"] = client.encode(items)
                except BaseException as e:  # noqa: BLE001 - reported below, with the server's side
                    outcome["error"] = e

            caller = threading.Thread(target=call)
            caller.start()
            # Accepted (and being decoded): a fixed sleep was not enough under load.
            assert wait_for(lambda: _inflight_requests(metrics_port) >= 1, timeout_s=30, interval_s=0.005)
            assert caller.is_alive(), "the call finished before the signal could be sent: the test proves nothing"
            (os.killpg if to_group else os.kill)(proc.pid, sig)
            time.sleep(0.3)
            with pytest.raises(grpc.RpcError) as late:
                client.encode(items[:1], timeout=10)
            assert late.value.code() == grpc.StatusCode.UNAVAILABLE, _evidence(proc, log, late.value)
            caller.join()
        assert "result" in outcome, "the call in flight failed: " + _evidence(proc, log, outcome.get("error"))
        assert [i.item_id for i in outcome["result"].items] == [str(i) for i in range(16)]
        assert proc.wait(timeout=60) == 0, _evidence(proc, log, None)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
