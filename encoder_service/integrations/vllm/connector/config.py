"""The connector's settings: vLLM's `ec_connector_extra_config`, every key checked (an unknown one is refused
with its name)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from encoder_service.contract.settings import from_mapping

FALLBACKS = ("local", "fail")


@dataclass
class PoolConnectorConfig:
    address: str | list[str] = field(default_factory=list)  # the pool: Serve gRPC proxies or a standalone server
    application: str = ""  # Serve application name (gRPC metadata "application"); "" for a standalone server
    # The shared secret the front end binds items with (`binding`); "": $ENCODER_POOL_BINDING_KEY_FILE.
    binding_key_file: str = ""
    # The pool's bearer token for this vLLM ("": $ENCODER_SERVICE_TOKEN_FILE / $ENCODER_SERVICE_TOKEN); each
    # user's items are fetched from that user's tenant inside it.
    token_file: str = ""
    # An item the pool cannot give in time (down, refusing, evicted, too slow, wrong rows): "local" lets vLLM's
    # own vision encoder run for it (the media are in the request); "fail" fails the request.
    fallback: str = "local"
    fetch_budget_s: float = 2.0  # per item, from the request's first look: then fall back
    attempt_timeout_s: float = 1.0  # one fetch attempt
    pool_down_cooldown_s: float = 5.0  # after the pool was unreachable, items fall back at once this long
    fetch_threads: int = 8
    # Fetched rows wait for the workers here (bytes path); 0: vLLM's encoder-cache budget in bytes.
    staging_mb: int = 0
    staging_dir: str = ""  # default: /dev/shm
    verify_fingerprint: bool = True  # refuse, at start-up, a pool serving another model than this checkpoint's
    expected_checkpoint: str = ""  # the checkpoint the pool must serve; default: vLLM's model directory
    connections: int = 1  # TCP connections per pool address
    # "nixl": the scheduler gets where an item's rows are (a few hundred bytes, a lease), the workers read them
    # with NIXL straight into their encoder cache: no staging file, no rows through the engine-core process.
    # A pool answering inline (NIXL off there) is staged as with "bytes"; a read that fails is fetched again
    # as bytes by the worker.
    transfer: str = "bytes"
    ucx_transports: str = ""  # UCX_TLS for this vLLM's NIXL agents ("": UCX's choice)

    def __post_init__(self):
        if isinstance(self.address, str):
            self.address = [self.address] if self.address else []
        if not self.address:
            raise ValueError("EncoderPoolConnector needs ec_connector_extra_config.address (the pool's host:port)")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, not {self.fallback!r}")
        if self.transfer not in ("bytes", "nixl"):
            raise ValueError(f"transfer must be bytes or nixl, not {self.transfer!r}")

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> "PoolConnectorConfig":
        return from_mapping(cls, extra or {}, "ec_connector_extra_config")
