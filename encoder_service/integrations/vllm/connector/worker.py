"""The connector's worker side (each of vLLM's worker processes): the rows of this step's items into vLLM's
encoder cache, on the worker's device, in the model's dtype: read from the staging area (bytes), or with
NIXL straight from the pool's memory (`transfer: nixl`; a read that fails is fetched again as bytes, by
digest, from the pool). Back to the scheduler side: which steps' loads are done (a staged item is kept
until then: safe under async scheduling)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorMetadata, ECConnectorWorkerMetadata

from encoder_service.client.checks import check_rows
from encoder_service.client.pool import PoolEncoderClient
from encoder_service.contract.result import dtype_from_name
from encoder_service.integrations.vllm.connector.clients import nixl_reader, pool_client
from encoder_service.integrations.vllm.connector.config import PoolConnectorConfig
from encoder_service.integrations.vllm.connector.scheduler import Load
from encoder_service.integrations.vllm.connector.staging import read_rows
from encoder_service.transfer.nixl import TransferFailed

log = logging.getLogger("encoder_service.integrations.vllm.connector")


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
    def __init__(self, cfg: PoolConnectorConfig, hidden_size: int, dtype: torch.dtype, sole_reader: bool = True):
        self.cfg, self.hidden_size, self.dtype = cfg, hidden_size, dtype
        self.sole_reader = sole_reader  # the only worker: it gives each lease back once it has read it
        self._done: set[int] = set()
        self.reader = nixl_reader(cfg)
        self._pool: PoolEncoderClient | None = None
        self.read_fallbacks = 0

    def load(self, metadata: PoolConnectorMetadata, encoder_cache: dict[str, torch.Tensor]) -> None:
        from vllm.platforms import current_platform

        device = current_platform.device_type
        if current_platform.is_cuda_alike():
            device = f"{device}:{current_platform.current_device()}"
        for load in metadata.loads:
            if load.identifier in encoder_cache:
                continue
            if load.reference is not None:
                rows = self._read(load, torch.device(device))
            else:
                rows = read_rows(load.path, load.rows, self.hidden_size, self.dtype)
            encoder_cache[load.identifier] = rows.to(device=device, dtype=self.dtype)
        self._done.add(metadata.step)

    def _read(self, load: Load, device: torch.device) -> torch.Tensor:
        """An item's rows with NIXL, into this worker's device memory; as bytes from the pool if that fails.
        Only both failing fails the step (vLLM cannot encode the item at this point). The lease is given back
        here by a sole worker; with several (every worker of a parallel group reads it), by the scheduler side
        once all their steps are back, or at its expiry."""
        try:
            if self.reader is None:
                raise TransferFailed("no NIXL agent in this worker")
            dtype = dtype_from_name(load.dtype)
            out = torch.empty(load.rows, self.hidden_size, dtype=dtype, device=device)
            return self.reader.read(load.reference, dtype, self.hidden_size, out=out, release=self.sole_reader)
        except Exception as e:  # noqa: BLE001 - whatever NIXL raised: the bytes path next
            self.read_fallbacks += 1
            log.warning("reading an item's rows with NIXL failed (%s): fetching them as bytes", e)
        try:
            result = self._bytes_client().encode([load.bound.media()], tenant=load.bound.tenant)
            check_rows(result.embeddings, load.rows, self.hidden_size, f"{load.bound.digest[:19]}…")
        except Exception as e:
            raise RuntimeError(f"the encoder pool's rows for item {load.bound.digest[:19]}… could not be read with "
                               f"NIXL nor fetched as bytes ({e!r}); vLLM's encoder cache lacks them") from e
        return result.embeddings

    def _bytes_client(self) -> PoolEncoderClient:
        if self._pool is None:
            self._pool = pool_client(self.cfg, total_timeout_s=30.0)
        return self._pool

    def worker_meta(self) -> PoolWorkerMetadata | None:
        if not self._done:
            return None
        done, self._done = self._done, set()
        return PoolWorkerMetadata(done)
