"""Starting vLLM's OpenAI server as a consumer of the pool, and the front end before it (tests, benches,
and a reference for deployments: the flags are the ones to use).

    connector = consumer_config("pool-host:9000", application="encoder")
    vllm = start_vllm_server(python, model_dir, 8000, connector, log_path)
    front = start_frontend("pool-host:9000", "http://127.0.0.1:8000", 8080, log_path)
    wait_http("http://127.0.0.1:8000/health", vllm, log_path)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CONNECTOR_MODULE = "encoder_service.integrations.vllm.connector"


def consumer_config(address: str, **extra) -> dict:
    """vLLM's `ec_transfer_config` for a consumer fed by the pool at `address` (`extra`: PoolConnectorConfig fields)."""
    return {"ec_connector": "EncoderPoolConnector", "ec_role": "ec_consumer",
            "ec_connector_module_path": CONNECTOR_MODULE, "ec_connector_extra_config": {"address": address, **extra}}


def start_vllm_server(python: str, model: str | Path, port: int, connector: dict | None, log: Path,
                      *args: str) -> subprocess.Popen:
    """vLLM's OpenAI server (its own environment's `python`) on loopback; CPU settings from vLLM's docs."""
    env = {**os.environ, "PYTHONPATH": "", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")}
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
               "--host", "127.0.0.1", *args]
    if connector is not None:
        command += ["--ec-transfer-config", json.dumps(connector)]
    return subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=Path(log).parent)


def start_frontend(pool: str, vllm_url: str, port: int, log: Path, application: str = "") -> subprocess.Popen:
    command = [sys.executable, "-m", "encoder_service.integrations.vllm.frontend", "--pool", pool, "--vllm", vllm_url,
               "--port", str(port)]
    if application:
        command += ["--application", application]
    return subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 240.0) -> None:
    """Until `url` answers 200; the server's log in the error if it exits or never answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited (code {proc.returncode}):\n{Path(log).read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s:\n{Path(log).read_text()[-4000:]}")


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
