"""The connector's scheduler side (vLLM's engine-core process): which items the pool answers for, fetching
them in time, and what happens when it cannot.

For each item of a request the scheduler considers (`ensure_cache_available`):
- inside the prefix-cached span, or already in vLLM's encoder cache: nothing to do;
- not bound by the front end (`binding.Binder.verify` fails: a user's own `uuid`, a bare digest, a forged
  binding): vLLM's own encoder runs for it; an item the front end bound whose identifier vLLM re-hashed
  (per-request processor kwargs, a vision LoRA) is counted as bypassed, with a warning;
- bound: fetched from the pool by digest, in the binding's tenant, keyed for affinity by its digest
  (`PoolEncoderClient`), on a background thread, as soon as the request is first seen. Its rows are checked
  (count = the prompt's placeholders, width = the LLM's, the expected model) and staged for the workers.
  The request waits while fetches are in flight; it is ready in the very step its last fetch completes.
An item the pool cannot give within `fetch_budget_s` (unreachable: at once, and every item for
`pool_down_cooldown_s` after; evicted or never uploaded; refused; wrong rows; no staging room) falls back:
vLLM's own encoder runs for it (`fallback: local`, it holds the media) or the request fails (`fail`).

A staged item lives while a request needs it and until every step that told the workers to load it has
come back from them (async scheduling runs the scheduler ahead of the workers); then its bytes go.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from encoder_service.client.checks import EmbeddingCountMismatch, WrongEncoder
from encoder_service.contract.model_info import ModelFingerprint
from encoder_service.contract.reference import RowsReference
from encoder_service.contract.result import dtype_name
from encoder_service.fingerprint import of_checkpoint
from encoder_service.integrations.vllm.binding import Binder, Bound
from encoder_service.integrations.vllm.connector.config import PoolConnectorConfig
from encoder_service.integrations.vllm.connector.clients import check_pool, nixl_reader, pool_client
from encoder_service.integrations.vllm.connector.fetcher import RowFetcher
from encoder_service.integrations.vllm.connector.staging import StagingArea

log = logging.getLogger("encoder_service.integrations.vllm.connector")

LEASE_MARGIN_S = 5.0  # rows by reference whose lease ends sooner are fetched again before workers read them
MISS_RETRY_S = 0.025  # an item not (yet) in the pool: the front end's upload may still be on its way
# An empty step while items are on their way: vLLM steps again after 1 ms, each step a round trip to the
# workers that competes for the CPU (and this process's GIL) with the fetches; the step waits instead, until
# a fetch completes or this long (a request arriving meanwhile waits at most this).
IDLE_STEP_WAIT_S = 0.01


class State(enum.Enum):
    WAITING = "waiting"  # for staging room
    FETCHING = "fetching"
    STAGED = "staged"
    LOCAL = "local"  # vLLM's own encoder runs for it
    FAILED = "failed"  # fallback "fail": its requests fail


@dataclass(eq=False)
class Item:
    identifier: str
    bound: Bound
    rows: int
    nbytes: int
    first_seen: float
    users: set[str] = field(default_factory=set)  # request ids that need it
    state: State = State.WAITING
    future: Future | None = None
    retry_at: float = 0.0
    path: str = ""  # staged rows (bytes path)
    reference: RowsReference | None = None  # where the rows are (NIXL path): the workers read them
    dtype: str = ""  # of the rows at the pool
    loads_pending: set[int] = field(default_factory=set)  # steps that told workers to load it, not yet back
    reason: str = ""

    @property
    def name(self) -> str:
        """Its staging file's name: the binding's MAC (unique per binding)."""
        return self.identifier.rsplit(":", 1)[-1]


@dataclass
class Load:
    """What a worker loads for one item this step: staged bytes (`path`), or rows to read with NIXL
    (`reference`, in the pool's `dtype`; `bound`: what to fetch as bytes if that read fails)."""

    identifier: str
    path: str
    rows: int
    reference: RowsReference | None = None
    dtype: str = ""
    bound: Bound | None = None


class SchedulerSide:
    def __init__(self, cfg: PoolConnectorConfig, vllm_config):
        model = vllm_config.model_config
        self.cfg = cfg
        self.hidden_size, self.dtype = model.get_hidden_size(), model.dtype
        self.binder = Binder.from_file(cfg.binding_key_file or None)
        self.pool = pool_client(cfg, cfg.fetch_budget_s)
        self.expected: ModelFingerprint | None = None
        if cfg.verify_fingerprint:
            self.expected = of_checkpoint(cfg.expected_checkpoint or model.model, dtype_name(self.dtype))
            check_pool(self.pool, self.expected, cfg.address)
        self.reader = nixl_reader(cfg)  # NIXL: gives back leases of items workers never read
        if self.reader is None:
            cfg.transfer = "bytes"
        budget = cfg.staging_mb << 20 or self._encoder_cache_bytes(vllm_config)
        self.staging = StagingArea(budget, Path(cfg.staging_dir) if cfg.staging_dir else None)
        self.fetcher = RowFetcher(self.pool, self.staging, self.reader, self.expected, self.hidden_size, self.dtype,
                                  by_reference=cfg.transfer == "nixl")
        self._threads = ThreadPoolExecutor(cfg.fetch_threads, thread_name_prefix="encoder-pool-fetch")
        self._lock = threading.Lock()
        self._progress = threading.Event()  # set when a fetch completes
        self.items: dict[str, Item] = {}
        self._requests: dict[str, float | None] = {}  # request id -> when first seen; None once it was ready
        self._vllm_cached: set[str] = set()  # identifiers in vLLM's own encoder cache
        self._to_load: dict[str, Load] = {}
        self._unavailable: dict[str, str] = {}
        self._pool_down_until = 0.0
        self._step = 0
        self._stats: dict[str, Any] = {}  # since the last report
        self._reported_staged = 0
        self.totals: dict[str, float] = {}  # since start (tests, operators)

    def _encoder_cache_bytes(self, vllm_config) -> int:
        """vLLM's encoder-cache budget (embeddings) in bytes: staging never holds more than vLLM would."""
        embeds = getattr(vllm_config.scheduler_config, "encoder_cache_size", 0) or 16384
        return embeds * self.hidden_size * self.dtype.itemsize

    # ------------------------------------------------------------------ the scheduler's questions

    def ensure_cache_available(self, request, num_computed_tokens: int) -> bool:
        """True once every item of the request the pool answers for is staged or left to vLLM; starts what is
        missing; False defers the request to a later step."""
        rid, now = request.request_id, time.monotonic()
        with self._lock:
            if rid in self._unavailable:
                return False
            bound = self._bound_items(request, num_computed_tokens, first_look=rid not in self._requests)
            ready = True
            for index, feature, binding in bound:
                item = self.items.get(feature.identifier)
                if item is None:
                    rows = request.get_num_encoder_embeds(index)
                    item = Item(feature.identifier, binding, rows, rows * self.hidden_size * self.dtype.itemsize, now)
                    self.items[feature.identifier] = item
                item.users.add(rid)
                if not self._advance(item, now):
                    ready = False
                if item.state == State.FAILED:
                    self._unavailable[rid] = f"the encoder pool could not give an item: {item.reason}"
                    return False
                if item.state == State.STAGED and item.rows != request.get_num_encoder_embeds(index):
                    self._fall_back(item, "rejected", f"{item.rows} rows staged, the prompt has "
                                    f"{request.get_num_encoder_embeds(index)} placeholders")
            first = self._requests.setdefault(rid, now)
            if ready and first is not None:  # counted once: the scheduler asks every step while it runs
                self._count_wait(now - first)
                self._requests[rid] = None
            return ready

    def _bound_items(self, request, num_computed_tokens: int, first_look: bool) -> list[tuple[int, Any, Bound]]:
        """The request's items the pool answers for and that still need rows (`first_look`: the scheduler asks
        about the request for the first time; it asks again every step while it runs)."""
        out, expected = [], _announced(request)
        for index, feature in enumerate(request.mm_features):
            computed = feature.mm_position.offset + feature.mm_position.length <= num_computed_tokens
            if computed and not first_look:
                continue  # a running request's item already in the KV cache (no binding check each step)
            binding = self.binder.verify(feature.identifier)
            if binding is None:
                continue
            expected -= 1
            if computed:
                self._count("prefix_cached_items")
                continue
            if feature.identifier in self._vllm_cached:
                continue
            out.append((index, feature, binding))
        if first_look and expected > 0:
            self._count("bypassed_items", expected)
            log.warning("request %s: %d item(s) the front end bound to the encoder pool reached the connector "
                        "under another identifier (per-request processor kwargs or a vision LoRA make vLLM "
                        "re-hash them): vLLM encodes them itself", request.request_id, expected)
        return out

    def _advance(self, item: Item, now: float) -> bool:
        """Move an item on (caller holds the lock); True when the request need not wait for it."""
        if (item.state == State.STAGED and item.reference is not None and not item.loads_pending
                and item.reference.seconds_left() < LEASE_MARGIN_S):  # the lease may end before workers read
            self._unstage(item)
            item.state, item.first_seen, item.retry_at = State.WAITING, now, 0.0
        if item.state in (State.STAGED, State.LOCAL, State.FAILED):
            return True
        if item.state == State.FETCHING and item.future.done():
            self._settle(item, now)
            return item.state != State.WAITING and self._advance(item, now)
        if item.state == State.FETCHING:
            return False
        # WAITING: for staging room, or to try again after a miss
        if now >= self._pool_down_until and now - item.first_seen >= self.cfg.fetch_budget_s:
            self._fall_back(item, "missing" if item.retry_at else "staging_full",
                            f"not in the pool within {self.cfg.fetch_budget_s:g} s")
            return True
        if now < self._pool_down_until:
            self._fall_back(item, "pool_down", "the encoder pool is unreachable")
            return True
        if now < item.retry_at or not self.staging.reserve(item.nbytes):
            return False
        item.state = State.FETCHING
        item.future = self._threads.submit(self.fetcher.fetch, item.bound, item.name)
        item.future.add_done_callback(lambda _: self._progress.set())
        return False

    def _settle(self, item: Item, now: float) -> None:
        """A finished fetch (caller holds the lock): staged, tried again later, or fallen back."""
        try:
            fetched = item.future.result()
            result = fetched.result
            if result.items[0].token_count != item.rows:
                self.fetcher.discard(fetched)
                raise EmbeddingCountMismatch(f"{item.bound.digest[:19]}…: {result.items[0].token_count} rows, the "
                                             f"prompt has {item.rows} placeholders")
        except grpc.RpcError as e:
            self.staging.unreserve(item.nbytes)
            if e.code() == grpc.StatusCode.NOT_FOUND and now - item.first_seen < self.cfg.fetch_budget_s:
                item.state, item.retry_at = State.WAITING, now + MISS_RETRY_S  # the upload may be on its way
                return
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self._pool_down_until = now + self.cfg.pool_down_cooldown_s
                log.warning("the encoder pool is unreachable or too slow (%s): vLLM encodes items itself for %g s",
                            e.code().name, self.cfg.pool_down_cooldown_s)
                reason = "pool_down" if e.code() == grpc.StatusCode.UNAVAILABLE else "timeout"
                self._fall_back(item, reason, f"{e.code().name}: {e.details()}")
                return
            reason = "missing" if e.code() == grpc.StatusCode.NOT_FOUND else "rejected"
            self._fall_back(item, reason, f"{e.code().name}: {e.details()}")
            return
        except (EmbeddingCountMismatch, WrongEncoder) as e:
            self.staging.unreserve(item.nbytes)
            log.error("the encoder pool's rows for %s… cannot be used: %s", item.bound.digest[:19], e)
            self._fall_back(item, "rejected", str(e))
            return
        except Exception as e:  # noqa: BLE001 - undecodable answer, no room to stage (OSError): vLLM encodes it
            self.staging.unreserve(item.nbytes)
            log.error("fetching %s… failed: %r", item.bound.digest[:19], e)
            self._fall_back(item, "staging_full" if isinstance(e, OSError) else "rejected", repr(e))
            return
        if result.reference is not None:  # the workers read the rows; only their bytes are reserved here
            item.reference, item.dtype = result.reference, dtype_name(result.dtype)
            self._count("by_reference")
        else:
            item.path = fetched.path
            self._count("staged_files")
        item.state = State.STAGED
        self._count("fetches")
        self._count("fetch_seconds", fetched.seconds)
        self._count("fetched_bytes", item.nbytes)
        if not item.users:
            self._free(item)

    def _fall_back(self, item: Item, reason: str, why: str) -> None:
        """vLLM's own encoder runs for the item from now on (or its requests fail); lock held, nothing reserved."""
        item.reason = why
        self._count(f"fallback_{reason}")
        if item.state == State.STAGED:
            self._unstage(item)
        item.state = State.LOCAL if self.cfg.fallback == "local" else State.FAILED
        log.info("item %s… %s: %s (%s)", item.bound.digest[:19],
                 "left to vLLM's encoder" if item.state == State.LOCAL else "failed", reason, why)

    def has_cache_item(self, identifier: str) -> bool:
        with self._lock:
            item = self.items.get(identifier)
            return item is not None and item.state == State.STAGED

    def update_state_after_alloc(self, request, index: int) -> None:
        identifier = request.mm_features[index].identifier
        with self._lock:
            self._vllm_cached.add(identifier)
            item = self.items.get(identifier)
            if item is not None and item.state == State.STAGED:
                self._to_load[identifier] = Load(identifier, item.path, item.rows, item.reference, item.dtype,
                                                 item.bound)

    def build_connector_meta(self, scheduler_output) -> tuple[int, list[Load]]:
        if getattr(scheduler_output, "total_num_scheduled_tokens", 1) == 0:
            self._wait_for_progress()
        with self._lock:
            self._settle_orphans()
            self._step += 1
            for identifier in getattr(scheduler_output, "free_encoder_mm_hashes", ()) or ():
                self._vllm_cached.discard(identifier)
            loads, self._to_load = list(self._to_load.values()), {}
            for load in loads:
                self.items[load.identifier].loads_pending.add(self._step)
            return self._step, loads

    def _settle_orphans(self) -> None:
        """Fetches that finished for requests already gone (aborted mid-fetch): settled and freed, so their
        reservations (and leases) do not outlive them (lock held)."""
        now = time.monotonic()
        for item in [i for i in self.items.values() if not i.users and i.state == State.FETCHING and i.future.done()]:
            self._settle(item, now)
            self._free(item)

    def _wait_for_progress(self) -> None:
        """An empty step: wait (GIL released) until a fetch completes, a miss is due to be retried, or
        IDLE_STEP_WAIT_S; nothing in flight: no wait."""
        self._progress.clear()
        now = time.monotonic()
        with self._lock:
            fetching = any(item.state == State.FETCHING for item in self.items.values())
            retries = [item.retry_at - now for item in self.items.values()
                       if item.state == State.WAITING and item.retry_at > now]
        if fetching or retries:
            self._progress.wait(min([IDLE_STEP_WAIT_S, *retries]))

    def steps_done(self, steps: set[int]) -> None:
        """The workers came back from these steps: their loads are done."""
        with self._lock:
            for item in list(self.items.values()):
                if item.loads_pending & steps:
                    item.loads_pending -= steps
                    if not item.users:
                        self._free(item)

    def take_unavailable_requests(self) -> set[str]:
        with self._lock:
            failed, self._unavailable = self._unavailable, {}
            for rid, reason in failed.items():
                log.error("request %s failed: %s", rid, reason)
                self._forget(rid)
        return set(failed)

    def request_finished(self, request) -> None:
        with self._lock:
            self._forget(request.request_id)

    def _forget(self, rid: str) -> None:
        """A request is over (finished, aborted, failed): its items go once nothing needs them (lock held)."""
        self._requests.pop(rid, None)
        for item in [i for i in self.items.values() if rid in i.users]:
            item.users.discard(rid)
            if not item.users:
                self._free(item)

    def _free(self, item: Item) -> None:
        """Drop an item nobody needs (lock held): a fetch in flight settles first, a load in flight comes back."""
        if self.items.get(item.identifier) is not item or item.state == State.FETCHING or item.loads_pending:
            return
        if item.state == State.STAGED:
            self._unstage(item)
        self.items.pop(item.identifier, None)

    def _unstage(self, item: Item) -> None:
        """A staged item's bytes go: its file, or its lease at the pool (given back; a worker that read it gave
        it back already, which the pool ignores twice)."""
        if item.reference is not None:
            if self.reader is not None:
                self.reader.release(item.reference)
            item.reference = None
        self.staging.remove(item.name, item.nbytes)

    # ------------------------------------------------------------------ reports and lifecycle

    def _count(self, key: str, amount: float = 1) -> None:
        self._stats[key] = self._stats.get(key, 0) + amount
        self.totals[key] = self.totals.get(key, 0) + amount

    def _count_wait(self, seconds: float) -> None:
        self._stats.setdefault("waits", []).append(seconds)

    def stats(self) -> dict[str, Any]:
        """What happened since the last call; `staged_bytes` only when it changed (vLLM asks every step, and
        ships what it gets to its API server)."""
        with self._lock:
            data, self._stats = self._stats, {}
        if self.staging.reserved != self._reported_staged:
            data["staged_bytes"] = self._reported_staged = self.staging.reserved
        return data

    def shutdown(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self.pool.close()
        self.staging.close()


def _announced(request) -> int:
    """How many of the request's items the front end bound (its `ec_transfer_params`)."""
    params = getattr(request, "ec_transfer_params", None) or {}
    try:
        return int((params.get("encoder_pool") or {}).get("items", 0))
    except (TypeError, ValueError, AttributeError):
        return 0
