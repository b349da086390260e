"""vLLM's ECConnector, consumer role, fed by the encoder pool: vLLM never runs its vision encoder for an
item the pool holds.

    LLM(model=DIR, ec_transfer_config={
        "ec_connector": "EncoderPoolConnector",
        "ec_connector_module_path": "encoder_service.integrations.vllm.connector",
        "ec_role": "ec_consumer",
        "ec_connector_extra_config": {"address": "pool-host:9000", "application": "encoder"}})

An item is the pool's when its vLLM identifier (the request's `multi_modal_uuids`, verbatim) is a
media digest (`sha256:...`): the front end (`frontend.py`) sends the media to the pool first and
forwards the request with the pool's digests. Other items are left to vLLM's own encoder.

Scheduler side (engine-core process): `ensure_cache_available` starts fetching a request's items from
the pool by digest (background threads) and defers the request until every one is staged; a fetched
item is checked before anything of it reaches vLLM — rows == the request's placeholders for it
(`get_num_encoder_embeds`), width == the LLM's hidden size, produced by the model this checkpoint
expects (`extras["model"]`) — and written to a staging file (safetensors, no pickle). A transient
failure (pool down, busy, deadline of an attempt) is retried until the request's `deadline_s`; any
other (a wrong count or width, another model, an item the pool no longer holds) fails only that
request, through `take_unavailable_requests`: vLLM reports it and goes on serving.
Worker side (each worker process): `start_load_caches` reads the staged rows of the items scheduled
this step onto the worker's device, in the model's dtype.

At start-up the pool's fingerprint (`GetModelInfo`) is compared with the one this checkpoint directory
gives (`encoder_service.fingerprint`): a pool serving another vision tower, preprocessing or width is
refused with the reason, before any request.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from safetensors.torch import load_file, save_file
from vllm.distributed.ec_transfer.ec_connector.base import ECConnectorBase, ECConnectorMetadata, ECConnectorRole
from vllm.distributed.ec_transfer.ec_connector.metrics import ECConnectorStats

from encoder_service.client.endpoint import EncoderClient
from encoder_service.contract.media import MediaDigest, MediaInput, Modality, is_media_digest
from encoder_service.contract.model_info import ModelFingerprint
from encoder_service.contract.result import dtype_name
from encoder_service.fingerprint import of_checkpoint

log = logging.getLogger(__name__)

RETRY_PAUSE_S = 0.5
TRANSIENT = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


@dataclass
class PoolConnectorConfig:
    """`ec_connector_extra_config`."""

    address: str  # the pool: a standalone server or the Serve gRPC proxy (host:port)
    application: str = ""  # Serve application name (gRPC metadata "application"); "" for a standalone server
    deadline_s: float = 60.0  # how long a request may wait for its items (retrying transient failures)
    attempt_timeout_s: float = 10.0
    fetch_threads: int = 8
    staging_dir: str = ""  # where fetched rows wait for the workers; default: a new directory in /dev/shm
    verify_fingerprint: bool = True  # refuse a pool serving another model (start-up and every response)
    expected_checkpoint: str = ""  # the checkpoint the pool must serve; default: vLLM's model directory

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> "PoolConnectorConfig":
        known = {k: v for k, v in extra.items() if k in cls.__dataclass_fields__}
        if "address" not in known:
            raise ValueError("EncoderPoolConnector needs ec_connector_extra_config.address (the pool's host:port)")
        return cls(**known)


class FetchFailed(Exception):
    """An item the pool cannot give this request (`transient`: worth retrying until the deadline)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


@dataclass
class StagedItem:
    path: str
    rows: int
    users: set[str] = field(default_factory=set)  # request ids that need it


@dataclass
class EncoderPoolMetadata(ECConnectorMetadata):
    """Scheduler -> workers, per step: (digest, staged file, rows) of the items to load."""

    items: list[tuple[str, str, int]] = field(default_factory=list)


@dataclass
class PoolConnectorStats(ECConnectorStats):
    """Fetches from the pool since the last report (summed over the interval)."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: "ECConnectorStats") -> "ECConnectorStats":
        for key, value in other.data.items():
            self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


class EncoderPoolConnector(ECConnectorBase):
    def __init__(self, vllm_config, role: ECConnectorRole):
        super().__init__(vllm_config=vllm_config, role=role)
        self.cfg = PoolConnectorConfig.from_extra(vllm_config.ec_transfer_config.ec_connector_extra_config or {})
        model = vllm_config.model_config
        self.hidden_size = model.get_hidden_size()
        self.dtype = model.dtype
        self._lock = threading.Lock()
        self._stats: dict[str, float] = {}
        if role == ECConnectorRole.SCHEDULER:
            self._start_scheduler_side(model)

    # ------------------------------------------------------------------ scheduler side

    def _start_scheduler_side(self, model) -> None:
        metadata = (("application", self.cfg.application),) if self.cfg.application else None
        self.client = EncoderClient(self.cfg.address, timeout=self.cfg.attempt_timeout_s)
        self._metadata = metadata
        self.expected: ModelFingerprint | None = None
        if self.cfg.verify_fingerprint:
            self.expected = of_checkpoint(self.cfg.expected_checkpoint or model.model, dtype_name(self.dtype))
            self._check_pool()
        self.staging = Path(self.cfg.staging_dir or tempfile.mkdtemp(prefix="encoder-pool-ec-", dir=_shm()))
        self.staging.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(self.cfg.fetch_threads, thread_name_prefix="encoder-pool-fetch")
        self._staged: dict[str, StagedItem] = {}
        self._fetching: dict[str, Future] = {}
        self._first_seen: dict[str, float] = {}  # request id -> when it first waited for an item
        self._unavailable: dict[str, str] = {}  # request id -> why
        self._retry_at: dict[str, float] = {}  # digest -> when a transient failure may be retried
        self._to_load: dict[str, tuple[str, int]] = {}

    def _check_pool(self) -> None:
        """Refuse a pool whose rows would be wrong for this model (with the reason), or one not answering."""
        try:
            info = self.client.model_info(timeout=self.cfg.attempt_timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise RuntimeError(f"the encoder pool at {self.cfg.address} does not answer GetModelInfo "
                               f"({e.code().name}: {e.details()})") from None
        if info.fingerprint is None:
            raise RuntimeError(f"the encoder pool at {self.cfg.address} reports no model fingerprint")
        problems = info.fingerprint.mismatches(self.expected)
        if problems:
            raise RuntimeError(f"the encoder pool at {self.cfg.address} serves another model than "
                               f"{self.cfg.expected_checkpoint or 'this checkpoint'}: {'; '.join(problems)}")

    def ensure_cache_available(self, request, num_computed_tokens: int) -> bool:
        """True once every pool item of the request is staged; starts what is missing; False defers it."""
        ours = [(i, f) for i, f in enumerate(request.mm_features) if is_media_digest(f.identifier)]
        if not ours:
            return True
        rid = request.request_id
        with self._lock:
            if rid in self._unavailable:
                return False
            ready = True
            for index, feature in ours:
                digest, rows = feature.identifier, request.get_num_encoder_embeds(index)
                staged = self._staged.get(digest)
                if staged is not None:
                    staged.users.add(rid)
                    if staged.rows != rows:
                        self._unavailable[rid] = (f"the pool's rows for {digest[:19]}… are {staged.rows}, the "
                                                  f"prompt has {rows} placeholders for it")
                        return False
                    continue
                ready = False
                future = self._fetching.get(digest)
                if future is None and time.monotonic() >= self._retry_at.get(digest, 0.0):
                    self._fetching[digest] = self._pool.submit(self._fetch, digest, feature.modality, rows)
                elif future is not None and future.done():
                    self._settle(digest, future, rid)
            if not ready:
                waited = time.monotonic() - self._first_seen.setdefault(rid, time.monotonic())
                if rid not in self._unavailable and waited > self.cfg.deadline_s:
                    self._unavailable[rid] = (f"its media were not available from the encoder pool within "
                                              f"{self.cfg.deadline_s:g} s")
            else:
                self._first_seen.pop(rid, None)
            return ready

    def _settle(self, digest: str, future: Future, rid: str) -> None:
        """A finished fetch (caller holds the lock): staged, or the request's verdict."""
        del self._fetching[digest]
        try:
            self._staged[digest] = future.result()
        except FetchFailed as e:
            if not e.transient:
                self._unavailable[rid] = str(e)
            else:  # another attempt after a pause (until the request's deadline)
                self._retry_at[digest] = time.monotonic() + RETRY_PAUSE_S

    def _fetch(self, digest: str, modality: str, rows: int) -> StagedItem:
        """The item's rows from the pool by digest, checked, written to a staging file."""
        started = time.perf_counter()
        item = MediaInput(Modality.VIDEO if modality == "video" else Modality.IMAGE, MediaDigest(digest))
        try:
            result = self.client.encode([item], timeout=self.cfg.attempt_timeout_s, metadata=self._metadata, copy=False)
        except grpc.RpcError as e:
            self._count("fetch_failures")
            transient = e.code() in TRANSIENT
            raise FetchFailed(f"the encoder pool could not give {digest[:19]}… ({e.code().name}: {e.details()})",
                              transient) from None
        embeddings = result.embeddings
        problem = None
        if self.expected is not None and result.extras.get("model") != self.expected.contract:
            problem = "the replica that answered serves another model"
        elif embeddings.shape[1] != self.hidden_size:
            problem = f"rows are {embeddings.shape[1]} wide, the LLM's hidden size is {self.hidden_size}"
        elif embeddings.shape[0] != rows:
            problem = f"{embeddings.shape[0]} rows, the prompt has {rows} placeholders for it"
        if problem:
            self._count("fetch_rejected")
            raise FetchFailed(f"the encoder pool's rows for {digest[:19]}… cannot be used: {problem}")
        path = self.staging / f"{digest.split(':', 1)[1]}.safetensors"
        partial = path.with_suffix(".partial")
        save_file({"rows": embeddings.clone()}, str(partial))
        os.replace(partial, path)
        self._count("fetches")
        self._count("fetched_bytes", embeddings.numel() * embeddings.element_size())
        self._count("fetch_seconds", time.perf_counter() - started)
        return StagedItem(str(path), rows)

    def has_cache_item(self, identifier: str) -> bool:
        with self._lock:
            return identifier in self._staged

    def update_state_after_alloc(self, request, index: int) -> None:
        identifier = request.mm_features[index].identifier
        with self._lock:
            staged = self._staged.get(identifier)
            if staged is not None:
                self._to_load[identifier] = (staged.path, staged.rows)

    def build_connector_meta(self, scheduler_output) -> EncoderPoolMetadata:
        with self._lock:
            items = [(digest, path, rows) for digest, (path, rows) in self._to_load.items()]
            self._to_load.clear()
        return EncoderPoolMetadata(items)

    def take_unavailable_requests(self) -> set[str]:
        with self._lock:
            failed, self._unavailable = self._unavailable, {}
            for rid, reason in failed.items():
                log.error("request %s failed: %s", rid, reason)
                self._first_seen.pop(rid, None)
                self._drop_user(rid)
        return set(failed)

    def request_finished(self, request) -> tuple[bool, dict[str, Any] | None]:
        with self._lock:
            self._first_seen.pop(request.request_id, None)
            self._drop_user(request.request_id)
        return False, None

    def _drop_user(self, rid: str) -> None:
        """The request no longer needs its staged items; a file nobody needs goes (caller holds the lock)."""
        for digest in [d for d, s in self._staged.items() if rid in s.users]:
            staged = self._staged[digest]
            staged.users.discard(rid)
            if not staged.users:
                del self._staged[digest]
                Path(staged.path).unlink(missing_ok=True)

    def get_ec_connector_stats(self) -> PoolConnectorStats | None:
        with self._lock:
            data, self._stats = self._stats, {}
        return PoolConnectorStats(data) if data else None

    @classmethod
    def build_ec_connector_stats(cls, data: dict[str, Any] | None = None) -> PoolConnectorStats:
        return PoolConnectorStats(dict(data or {}))

    def _count(self, key: str, amount: float = 1) -> None:
        with self._lock:
            self._stats[key] = self._stats.get(key, 0) + amount

    def shutdown(self) -> None:
        if self.role == ECConnectorRole.SCHEDULER:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self.client.close()
            if not self.cfg.staging_dir:
                shutil.rmtree(self.staging, ignore_errors=True)

    # ------------------------------------------------------------------ worker side

    def start_load_caches(self, encoder_cache: dict[str, torch.Tensor], **kwargs) -> None:
        """The staged rows of this step's items, onto this worker's device in the model's dtype."""
        from vllm.platforms import current_platform

        metadata = self._get_connector_metadata()
        device = current_platform.device_type
        if current_platform.is_cuda_alike():
            device = f"{device}:{current_platform.current_device()}"
        for digest, path, rows in metadata.items:
            if digest in encoder_cache:
                continue
            tensor = load_file(path)["rows"]
            if tuple(tensor.shape) != (rows, self.hidden_size):  # checked when staged; a file changed since
                raise RuntimeError(f"staged rows for {digest} are {list(tensor.shape)}, expected {[rows, self.hidden_size]}")
            encoder_cache[digest] = tensor.to(device=device, dtype=self.dtype)

    def save_caches(self, encoder_cache, mm_hash: str, **kwargs) -> None:
        """A consumer saves nothing (the pool is the producer)."""


def _shm() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
