"""vLLM's ECConnector, consumer role, fed by the encoder pool: vLLM does not run its vision encoder for an item
the pool holds for the request's user, and runs it for any other.

    LLM(model=DIR, ec_transfer_config={
        "ec_connector": "EncoderPoolConnector",
        "ec_connector_module_path": "encoder_service.integrations.vllm.connector",
        "ec_role": "ec_consumer",
        "ec_connector_extra_config": {"address": "pool-host:9000", "application": "encoder",
                                      "binding_key_file": "/run/secrets/binding-key"}})

Split as vLLM's own connectors are: `scheduler.SchedulerSide` in the engine-core process (which items, fetching,
fallback, staging, lifecycle), `worker.WorkerSide` in each worker (loading rows into the encoder cache). Which
items are the pool's, and why no user can claim another's: `binding`. Settings: `config.PoolConnectorConfig`.
Reports: `metrics` (vLLM's log line and Prometheus).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorBase, ECConnectorRole

from encoder_service.integrations.vllm.connector.config import PoolConnectorConfig
from encoder_service.integrations.vllm.connector.metrics import PoolConnectorPromMetrics, PoolConnectorStats
from encoder_service.integrations.vllm.connector.worker import PoolConnectorMetadata, PoolWorkerMetadata, WorkerSide

__all__ = ["EncoderPoolConnector", "PoolConnectorConfig"]


class EncoderPoolConnector(ECConnectorBase):
    def __init__(self, vllm_config, role: ECConnectorRole):
        super().__init__(vllm_config=vllm_config, role=role)
        self.cfg = PoolConnectorConfig.from_extra(vllm_config.ec_transfer_config.ec_connector_extra_config)
        model = vllm_config.model_config
        self.scheduler = self.worker = None
        if role == ECConnectorRole.SCHEDULER:
            from encoder_service.integrations.vllm.connector.scheduler import SchedulerSide

            self.scheduler = SchedulerSide(self.cfg, vllm_config)
        else:
            parallel = vllm_config.parallel_config
            self.worker = WorkerSide(self.cfg, model.get_hidden_size(), model.dtype,
                                     sole_reader=getattr(parallel, "world_size", 1) == 1)

    # ------------------------------------------------------------------ scheduler side

    def ensure_cache_available(self, request, num_computed_tokens: int) -> bool:
        return self.scheduler.ensure_cache_available(request, num_computed_tokens)

    def has_cache_item(self, identifier: str) -> bool:
        return self.scheduler.has_cache_item(identifier)

    def update_state_after_alloc(self, request, index: int) -> None:
        self.scheduler.update_state_after_alloc(request, index)

    def build_connector_meta(self, scheduler_output) -> PoolConnectorMetadata:
        step, loads = self.scheduler.build_connector_meta(scheduler_output)
        return PoolConnectorMetadata(step, loads)

    def update_connector_output(self, connector_output) -> None:
        meta = connector_output.ec_connector_worker_meta
        if isinstance(meta, PoolWorkerMetadata):
            self.scheduler.steps_done(meta.steps)

    def take_unavailable_requests(self) -> set[str]:
        return self.scheduler.take_unavailable_requests()

    def request_finished(self, request) -> tuple[bool, dict[str, Any] | None]:
        self.scheduler.request_finished(request)
        return False, None

    # ------------------------------------------------------------------ worker side

    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs) -> None:
        self.worker.load(self._get_connector_metadata(), encoder_cache)

    def build_connector_worker_meta(self) -> PoolWorkerMetadata | None:
        return self.worker.worker_meta() if self.worker is not None else None

    def save_caches(self, encoder_cache, mm_hash: str, **kwargs) -> None:
        """A consumer saves nothing (the pool is the producer)."""

    # ------------------------------------------------------------------ reports and lifecycle

    def get_ec_connector_stats(self) -> PoolConnectorStats | None:
        if self.scheduler is None:
            return None
        data = self.scheduler.stats()
        return PoolConnectorStats(data) if data else None

    @classmethod
    def build_ec_connector_stats(cls, data: dict[str, Any] | None = None) -> PoolConnectorStats:
        return PoolConnectorStats(dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return PoolConnectorPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown()
