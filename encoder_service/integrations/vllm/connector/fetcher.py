"""One bound item's rows from the pool, on a fetch thread: checked (model, width, count) and then staged for
the workers (bytes) or kept as a reference they read with NIXL. What cannot be used is undone at once: a
staged file removed, a lease given back."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from encoder_service.client.checks import answer_models, check_answer_model, check_rows
from encoder_service.contract.model_info import ModelFingerprint
from encoder_service.contract.result import EncodeResult
from encoder_service.integrations.vllm.binding import Bound
from encoder_service.integrations.vllm.connector.staging import StagingArea
from encoder_service.proto import encoder_pb2 as pb


@dataclass
class Fetched:
    result: EncodeResult
    path: str  # the staged file ("" for rows by reference)
    seconds: float


@dataclass
class RowFetcher:
    """What the fetch threads run; the scheduler side owns the state."""

    pool: object  # PoolEncoderClient
    staging: StagingArea
    reader: object | None  # transfer.reader.RowReader: gives back leases of rows not used
    expected: ModelFingerprint | None
    hidden_size: int
    dtype: torch.dtype
    by_reference: bool

    def fetch(self, bound: Bound, name: str) -> Fetched:
        started = time.perf_counter()
        rows = pb.ROWS_BY_REFERENCE if self.by_reference else pb.ROWS_INLINE
        result = self.pool.encode([bound.media()], tenant=bound.tenant, rows=rows)
        try:
            if self.expected is not None:
                check_answer_model(answer_models(result), self.expected)
            shape = (result.items[0].token_count, result.shape[1]) if result.reference else result.embeddings
            check_rows(shape, result.items[0].token_count, self.hidden_size, f"{bound.digest[:19]}…")
            path = "" if result.reference else self.staging.write(name, result.embeddings.to(self.dtype))
        except BaseException:
            self.discard(Fetched(result, "", 0.0))
            raise
        return Fetched(result, path, time.perf_counter() - started)

    def discard(self, fetched: Fetched) -> None:
        """Rows that will not be used: the staged file goes, the lease is given back."""
        if fetched.path:
            Path(fetched.path).unlink(missing_ok=True)
        elif fetched.result.reference is not None and self.reader is not None:
            self.reader.release(fetched.result.reference)
