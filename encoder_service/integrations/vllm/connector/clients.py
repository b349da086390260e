"""How the connector reaches the pool, on both sides: its gRPC client (the one retry policy, the pool's token)
and, with `transfer: nixl`, its NIXL reader."""

from __future__ import annotations

import logging

import grpc

from encoder_service.client.checks import WrongEncoder, check_pool_model
from encoder_service.client.pool import PoolClientConfig, PoolEncoderClient
from encoder_service.client.retry import RetryPolicy
from encoder_service.client.security import ClientSecurity
from encoder_service.contract.model_info import ModelFingerprint
from encoder_service.integrations.vllm.connector.config import PoolConnectorConfig
from encoder_service.transfer.nixl import NixlSettings, NixlUnavailable
from encoder_service.transfer.reader import RowReader

log = logging.getLogger("encoder_service.integrations.vllm.connector")


def pool_client(cfg: PoolConnectorConfig, total_timeout_s: float) -> PoolEncoderClient:
    """The pool by gRPC: items by digest only (the connector never has the media), `total_timeout_s` per call."""
    policy = RetryPolicy(attempt_timeout_s=cfg.attempt_timeout_s, total_timeout_s=total_timeout_s, max_attempts=2,
                         backoff_s=0.05)
    return PoolEncoderClient(PoolClientConfig(cfg.address, cfg.application, retry=policy, probe=False,
                                              connections=cfg.connections),
                             security=ClientSecurity.from_env(cfg.token_file or None))


def check_pool(pool: PoolEncoderClient, expected: ModelFingerprint, address) -> None:
    """Refuse, with the reason, a pool whose rows would be wrong for this model, or one not answering."""
    try:
        info = pool.model_info()
    except grpc.RpcError as e:
        raise RuntimeError(f"the encoder pool at {address} does not answer GetModelInfo "
                           f"({e.code().name}: {e.details()})") from None
    try:
        check_pool_model(info, expected, f"the encoder pool at {address}")
    except WrongEncoder as e:
        raise RuntimeError(str(e)) from None


def nixl_reader(cfg: PoolConnectorConfig) -> RowReader | None:
    """This process's NIXL agent when `transfer: nixl` (None without NIXL here: rows then come as bytes)."""
    if cfg.transfer != "nixl":
        return None
    try:
        return RowReader(NixlSettings(ucx_transports=cfg.ucx_transports))
    except NixlUnavailable as e:
        log.warning("transfer nixl: %s; rows come as bytes", e)
        return None
