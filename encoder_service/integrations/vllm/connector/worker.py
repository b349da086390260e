"""The connector's worker side (each of vLLM's worker processes): the rows of this step's items into vLLM's
encoder cache, on the worker's device, in the model's dtype; and, back to the scheduler side, which step's
loads are done (a staged item is kept until then: safe under async scheduling)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorMetadata, ECConnectorWorkerMetadata

from encoder_service.integrations.vllm.connector.scheduler import Load
from encoder_service.integrations.vllm.connector.staging import read_rows


@dataclass
class PoolConnectorMetadata(ECConnectorMetadata):
    """Scheduler -> workers, per step: the step's number and its items to load."""

    step: int = 0
    loads: list[Load] = field(default_factory=list)


@dataclass
class PoolWorkerMetadata(ECConnectorWorkerMetadata):
    """Workers -> scheduler: the steps whose loads are done (every worker's, once aggregated)."""

    steps: set[int] = field(default_factory=set)

    def aggregate(self, other: ECConnectorWorkerMetadata) -> ECConnectorWorkerMetadata:
        if isinstance(other, PoolWorkerMetadata):
            self.steps |= other.steps
        return self


class WorkerSide:
    def __init__(self, hidden_size: int, dtype: torch.dtype):
        self.hidden_size, self.dtype = hidden_size, dtype
        self._done: set[int] = set()

    def load(self, metadata: PoolConnectorMetadata, encoder_cache: dict[str, torch.Tensor]) -> None:
        from vllm.platforms import current_platform

        device = current_platform.device_type
        if current_platform.is_cuda_alike():
            device = f"{device}:{current_platform.current_device()}"
        for load in metadata.loads:
            if load.identifier not in encoder_cache:
                rows = read_rows(load.path, load.rows, self.hidden_size, self.dtype)
                encoder_cache[load.identifier] = rows.to(device=device)
        self._done.add(metadata.step)

    def worker_meta(self) -> PoolWorkerMetadata | None:
        if not self._done:
            return None
        done, self._done = self._done, set()
        return PoolWorkerMetadata(done)
