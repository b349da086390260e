"""The NIXL agent (UCX backend) both sides of a by-reference transfer use, and its settings.

NIXL is optional (`pip install 'encoder-service[nixl]'`): `load_api` raises NixlUnavailable without it,
and every caller falls back to rows in the answer. Which wheel provides it (the `nixl` meta package, or
`nixl-cu12` / `nixl-cu13` alone) does not matter here.

UCX chooses its transports itself unless told: `ucx_transports` sets UCX_TLS (same node: "cma,tcp,self"
reads another process's memory in one copy; between nodes "rc,tcp,self" or "tcp,self"), `ucx_devices`
UCX_NET_DEVICES (the interface NIXL peers use: a peer that holds an agent's metadata can read all of its
registered memory, so name the interface your consumers are on). Both apply to agents created after they
are set, in this process.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

_MODULES = ("nixl._api", "nixl_cu12._api", "nixl_cu13._api")


class NixlUnavailable(RuntimeError):
    """NIXL cannot be used here (not installed, or its UCX backend did not start)."""


class TransferFailed(RuntimeError):
    """A NIXL transfer did not complete (peer gone or unreachable, lease expired): use bytes instead."""


@dataclass
class NixlSettings:
    enabled: bool = False  # an endpoint hands out references only when told to (see the trust model)
    ucx_transports: str = ""  # UCX_TLS for this process's agents ("": UCX's choice)
    ucx_devices: str = ""  # UCX_NET_DEVICES ("": all)
    lease_s: float = 30.0  # how long an endpoint holds rows it handed out by reference
    lease_mb_per_tenant: int = 1024  # rows one tenant may hold under lease at a time; beyond: inline answers
    lease_mb_total: int = 4096  # rows all tenants may hold under lease (leases of uncached rows hold the outputs arena)


def load_api():
    """nixl's Python API module (`nixl_agent`, `nixl_agent_config`). NIXL logs to stdout at INFO by default
    (where a server's first line says where it listens): WARNING unless $NIXL_LOG_LEVEL says otherwise."""
    level = os.environ.get("NIXL_LOG_LEVEL", "WARNING").upper()
    for name in _MODULES:
        try:
            api = importlib.import_module(name)
        except ImportError:
            continue
        for logger in [n for n in logging.root.manager.loggerDict if n == "nixl" or n.startswith("nixl.")]:
            logging.getLogger(logger).setLevel(level)
        return api
    raise NixlUnavailable("NIXL is not installed (pip install 'encoder-service[nixl]')")


_lock = threading.Lock()


def new_agent(role: str, settings: NixlSettings | None = None):
    """A NIXL agent with the UCX backend, named uniquely (`role`-host-pid-random: a restarted process is a new
    peer, never mistaken for the old one)."""
    settings = settings or NixlSettings()
    api = load_api()
    with _lock:  # UCX reads its environment when the agent starts
        for key, value in (("UCX_TLS", settings.ucx_transports), ("UCX_NET_DEVICES", settings.ucx_devices)):
            if value:
                os.environ[key] = value
        name = f"{role}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        # No progress thread: it polls UCX without pause (a whole core, idle or not); transfers progress when
        # their reader polls them, notifications when the endpoint reads them.
        config = api.nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
        if hasattr(api, "nixl_thread_sync_t"):  # callers' threads share the agent
            config.sync_mode = api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
        try:
            agent = api.nixl_agent(name, config)
        except Exception as e:  # noqa: BLE001 - nixl's own error types
            raise NixlUnavailable(f"NIXL's UCX backend did not start: {e}") from e
    if "UCX" not in agent.backends:
        raise NixlUnavailable("NIXL has no UCX backend here")
    return agent


def wait(agent, handle, timeout_s: float, what: str) -> None:
    """Until a posted transfer is done; TransferFailed on error or timeout (the handle is released)."""
    state = agent.transfer(handle)
    deadline = time.monotonic() + timeout_s
    spins = 0
    try:
        while state == "PROC":
            if time.monotonic() > deadline:
                raise TransferFailed(f"{what}: not done within {timeout_s:g} s")
            spins += 1
            if spins > 64:  # a long transfer: let other threads run
                time.sleep(0.0002)
            state = agent.check_xfer_state(handle)
        if state != "DONE":
            raise TransferFailed(f"{what}: NIXL reported {state}")
    finally:
        try:
            agent.release_xfer_handle(handle)
        except Exception:  # noqa: BLE001 - a transfer that cannot be cancelled still completes
            log.debug("could not release a NIXL transfer handle", exc_info=True)
