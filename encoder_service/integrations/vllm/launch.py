"""Starting vLLM's OpenAI server as a consumer of the pool, with the front end's work inside it (the
middleware) or before it (a separate front end): tests, benches, and a reference for deployments (the flags
are the ones to use).

    key = write_binding_key(workdir / "binding-key")
    connector = consumer_config("pool-host:9000", application="encoder", binding_key_file=str(key))
    frontend = frontend_config(workdir / "frontend.json", ["pool-host:9000"], application="encoder",
                               binding_key_file=str(key))
    vllm = start_vllm_server(python, model_dir, 8000, connector, log_path, middleware=frontend)
    wait_http("http://127.0.0.1:8000/health", vllm, log_path)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import secrets
import subprocess
import time
import urllib.request
from pathlib import Path

CONNECTOR_MODULE = "encoder_service.integrations.vllm.connector"
MIDDLEWARE = "encoder_service.integrations.vllm.middleware.EncoderPoolMiddleware"


def write_binding_key(path: str | Path) -> Path:
    """A fresh secret for the front end and the connector to bind items with (mode 0600)."""
    path = Path(path)
    path.write_bytes(secrets.token_hex(32).encode())
    path.chmod(0o600)
    return path


def consumer_config(address: str | list[str], **extra) -> dict:
    """vLLM's `ec_transfer_config` for a consumer fed by the pool (`extra`: PoolConnectorConfig fields)."""
    return {"ec_connector": "EncoderPoolConnector", "ec_role": "ec_consumer",
            "ec_connector_module_path": CONNECTOR_MODULE, "ec_connector_extra_config": {"address": address, **extra}}


def frontend_config(path: str | Path, pool: list[str], **fields) -> Path:
    """The middleware's config file (`chat.ChatBinderConfig` fields)."""
    path = Path(path)
    path.write_text(json.dumps({"pool": pool, **fields}))
    return path


def start_vllm_server(python: str, model: str | Path, port: int, connector: dict | None, log: Path, *args: str,
                      middleware: Path | None = None, env: dict | None = None,
                      cpus: set[int] | None = None) -> subprocess.Popen:
    """vLLM's OpenAI server (its own environment's `python`) on loopback; CPU settings from vLLM's docs.
    `middleware`: the front end's config: the pool's middleware runs inside the server. `cpus`: the cores
    it may run on (benches keep it apart from a pool on the same machine)."""
    env = {**os.environ, "PYTHONPATH": "", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"), **(env or {})}
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port),
               "--host", "127.0.0.1", *args]
    if connector is not None:
        command += ["--ec-transfer-config", json.dumps(connector)]
    if middleware is not None:
        command += ["--middleware", MIDDLEWARE]
        env["ENCODER_POOL_FRONTEND"] = str(middleware)
    return subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=Path(log).parent,
                            start_new_session=True, preexec_fn=_pinned(cpus))


def _pinned(cpus: set[int] | None):
    """A preexec_fn that pins the child (and so its children) to `cpus` (None: no pinning)."""
    return None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))


def start_frontend(python: str, pool: str, vllm_url: str, port: int, log: Path, application: str = "",
                   binding_key_file: str = "", env: dict | None = None, cpus: set[int] | None = None
                   ) -> subprocess.Popen:
    """The separate front end, run by `python` (an environment with this package's `vllm` extra)."""
    command = [python, "-m", "encoder_service.integrations.vllm.frontend", "--pool", pool, "--vllm", vllm_url,
               "--port", str(port)]
    if application:
        command += ["--application", application]
    if binding_key_file:
        command += ["--binding-key-file", binding_key_file]
    return subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": "", **(env or {})}, preexec_fn=_pinned(cpus))


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


def stop(*procs: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM, and wait until each server's whole process group is gone (vLLM's engine core and workers exit
    after its API server: what they hold, such as the connector's staging, is released only then); SIGKILL
    to what is left after `timeout_s`."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if not _group_gone(proc.pid, timeout_s):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            _group_gone(proc.pid, 10.0)


def _group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # the id was reused by a group that is not ours
        return False
