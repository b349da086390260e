"""What the connector reports: vLLM's log line (`ECConnectorStats`) and Prometheus (`build_prom_metrics`),
from the same counters. Counters are summed over an interval; `staged_bytes` is the latest value; `waits`
are per-request seconds from a request's first look to its items being ready (observed into a histogram).

    vllm:encoder_pool_fetches_total             items fetched from the pool
    vllm:encoder_pool_fetched_bytes_total       their rows' bytes
    vllm:encoder_pool_by_reference_total        of them, read by the workers with NIXL (transfer: nixl)
    vllm:encoder_pool_fallbacks_total{reason}   items vLLM encoded itself: pool_down, missing, timeout,
                                                rejected (wrong rows or model), staging_full
    vllm:encoder_pool_bypassed_items_total      items the front end bound whose identifier vLLM re-hashed
                                                (per-request processor kwargs, a vision LoRA): the pool unused
    vllm:encoder_pool_prefix_cached_items_total items inside the prefix-cached span: not fetched
    vllm:encoder_pool_staged_bytes              rows staged for the workers now
    vllm:encoder_pool_request_wait_seconds      how long requests waited for their items
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.ec_transfer.ec_connector.metrics import ECConnectorPromMetrics, ECConnectorStats

FALLBACK_REASONS = ("pool_down", "missing", "timeout", "rejected", "staging_full")
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class PoolConnectorStats(ECConnectorStats):
    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: ECConnectorStats) -> ECConnectorStats:
        for key, value in other.data.items():
            if key == "staged_bytes":
                self.data[key] = value
            elif key == "waits":
                self.data[key] = self.data.get(key, []) + list(value)
            else:
                self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        out = {k: v for k, v in self.data.items() if k != "waits"}
        waits = self.data.get("waits", [])
        if waits:
            out["requests_waited"] = len(waits)
            out["mean_wait_ms"] = round(1e3 * sum(waits) / len(waits), 2)
        return out

    def is_empty(self) -> bool:
        return not self.data


class PoolConnectorPromMetrics(ECConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames: list[str], per_engine_labelvalues: dict[int, list]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        counter, gauge, histogram = self._counter_cls, self._gauge_cls, self._histogram_cls
        self.fetches = counter(name="vllm:encoder_pool_fetches", documentation="Items fetched from the encoder pool.",
                               labelnames=labelnames)
        self.fetched_bytes = counter(name="vllm:encoder_pool_fetched_bytes", labelnames=labelnames,
                                     documentation="Bytes of rows fetched from the encoder pool.")
        self.by_reference = counter(name="vllm:encoder_pool_by_reference", labelnames=labelnames,
                                    documentation="Items whose rows the workers read from the pool with NIXL.")
        self.fallbacks = counter(name="vllm:encoder_pool_fallbacks", labelnames=labelnames + ["reason"],
                                 documentation="Items vLLM encoded itself because the pool could not give them.")
        self.bypassed = counter(name="vllm:encoder_pool_bypassed_items", labelnames=labelnames,
                                documentation="Items bound to the pool whose identifier vLLM re-hashed (pool unused).")
        self.prefix_cached = counter(name="vllm:encoder_pool_prefix_cached_items", labelnames=labelnames,
                                     documentation="Items inside the prefix-cached span: not fetched.")
        self.staged = gauge(name="vllm:encoder_pool_staged_bytes", documentation="Rows staged for the workers.",
                            multiprocess_mode="mostrecent", labelnames=labelnames)
        self.waits = histogram(name="vllm:encoder_pool_request_wait_seconds", buckets=list(WAIT_BUCKETS),
                               documentation="How long requests waited for their items from the pool.",
                               labelnames=labelnames)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        data = transfer_stats_data
        self.fetches.labels(*labels).inc(data.get("fetches", 0))
        self.fetched_bytes.labels(*labels).inc(data.get("fetched_bytes", 0))
        self.by_reference.labels(*labels).inc(data.get("by_reference", 0))
        for reason in FALLBACK_REASONS:
            if data.get(f"fallback_{reason}"):
                self.fallbacks.labels(*labels, reason).inc(data[f"fallback_{reason}"])
        self.bypassed.labels(*labels).inc(data.get("bypassed_items", 0))
        self.prefix_cached.labels(*labels).inc(data.get("prefix_cached_items", 0))
        if "staged_bytes" in data:
            self.staged.labels(*labels).set(data["staged_bytes"])
        for seconds in data.get("waits", []):
            self.waits.labels(*labels).observe(seconds)
