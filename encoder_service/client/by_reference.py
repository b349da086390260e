"""Asking for rows by reference (NIXL) and reading them, for every client of the pool: an answer that
carries a reference is read into one tensor of the caller's own; when NIXL cannot (not installed here, the
endpoint unreachable by NIXL, a lease that ended first) the call is made again with rows inline, logged
and counted. An endpoint without NIXL answers inline by itself."""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Callable

from encoder_service.contract.result import EncodeResult
from encoder_service.transfer.nixl import NixlSettings, NixlUnavailable, TransferFailed
from encoder_service.transfer.reader import shared_reader

log = logging.getLogger(__name__)

TRANSFERS = ("bytes", "nixl")


def check_transfer(transfer: str) -> str:
    if transfer not in TRANSFERS:
        raise ValueError(f"unknown transfer {transfer!r}; choose {' or '.join(TRANSFERS)}")
    return transfer


class ReferenceRows:
    def __init__(self, settings: NixlSettings | None = None):
        self.settings = settings
        self.reads = 0
        self.fallbacks = 0  # answers by reference that were asked again inline
        self._warned = False
        self._lock = threading.Lock()

    def resolve(self, result: EncodeResult, inline_again: Callable[[], EncodeResult]) -> EncodeResult:
        """`result` with its rows: read by reference, else from `inline_again()` (the same call, rows inline)."""
        if result.reference is None:
            return result
        reader = None
        try:
            reader = shared_reader(self.settings)
            if result.reference.nbytes != sum(result.token_counts) * result.shape[1] * result.dtype.itemsize:
                raise TransferFailed("the reference's bytes are not the answer's rows")
            rows = reader.read(result.reference, result.dtype, result.shape[1])
        except (NixlUnavailable, TransferFailed) as e:
            if reader is not None:
                reader.release(result.reference)  # the pool need not hold them until expiry
            with self._lock:
                self.fallbacks += 1
                warn, self._warned = not self._warned, True
            (log.warning if warn else log.debug)("rows by reference failed (%s): asking again with rows inline", e)
            return inline_again()
        with self._lock:
            self.reads += 1
        return dataclasses.replace(result, embeddings=rows, reference=None)
