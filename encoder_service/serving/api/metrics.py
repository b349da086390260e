"""Prometheus metrics of an encoder server or Serve replica.

One `EncoderMetrics` per transport process records every Encode: its status, the stage times the
model process measured (queue, preprocess, forward) plus the transport's own serialisation, batch
sizes, tokens and bytes out; gauges give requests/bytes in flight and, read from the model process
on each scrape, its shared-memory and GPU memory in use. Two sinks, same names:
  - the standalone server exposes them on `/metrics` (prometheus_client, `ServerConfig.metrics_port`);
  - a Ray Serve replica records them through `ray.util.metrics`, which Ray's metrics agent exports
    on every node (the `ray_` prefix is Ray's).
tokens/s and requests/s are `rate()` of the counters.
"""

from __future__ import annotations

from typing import Callable

STAGES = ("queue", "preprocess", "forward", "serialize")
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class EncoderMetrics:
    """prometheus_client metrics in their own registry (served by `serve_http`)."""

    def __init__(self, model_stats: Callable[[], dict] | None = None, inflight: Callable[[], tuple[int, int]] | None = None,
                 answers=None):
        """`answers` (`answers.Answers`): rows handed out by reference and their leases."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("encoder_requests", "Encode calls by gRPC status", ["code"], registry=r)
        self.latency = Histogram("encoder_request_seconds", "Encode latency, end to end in the server",
                                 buckets=LATENCY_BUCKETS_S, registry=r)
        self.stage = Histogram("encoder_stage_seconds", "Encode time per stage", ["stage"],
                               buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_tiles = Histogram("encoder_batch_tiles", "pieces in the largest batch a request joined",
                                     buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("encoder_batch_requests", "requests sharing that batch",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.items = Counter("encoder_items", "media items encoded", registry=r)
        self.tokens = Counter("encoder_tokens_out", "embedding rows sent", registry=r)
        self.bytes_out = Counter("encoder_bytes_out", "response bytes sent", registry=r)
        self.refused = Counter("encoder_refused", "calls turned away by admission control", registry=r)
        if inflight is not None:
            Gauge("encoder_inflight_requests", "Encode calls in flight", registry=r).set_function(
                lambda: inflight()[0])
            Gauge("encoder_inflight_request_bytes", "request bytes in flight", registry=r).set_function(
                lambda: inflight()[1])
        if model_stats is not None:
            r.register(_ModelStatsCollector(model_stats))
        if answers is not None:
            r.register(_LeaseCollector(answers))

    def record(self, code: str, seconds: float, stats: dict | None = None, items: int = 0, tokens: int = 0,
               nbytes: int = 0, serialize_s: float = 0.0) -> None:
        self.requests.labels(code).inc()
        self.latency.observe(seconds)
        if code != "OK":
            return
        stats = stats or {}
        for stage in ("queue", "preprocess", "forward"):
            if f"{stage}_ms" in stats:
                self.stage.labels(stage).observe(stats[f"{stage}_ms"] / 1e3)
        self.stage.labels("serialize").observe(serialize_s)
        if "batch_tiles" in stats:
            self.batch_tiles.observe(stats["batch_tiles"])
            self.batch_requests.observe(stats.get("batch_requests", 1))
        self.items.inc(items)
        self.tokens.inc(tokens)
        self.bytes_out.inc(nbytes)

    def refusal(self) -> None:
        self.refused.inc()

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """/metrics on `port` (0: a free one); returns the port."""
        from prometheus_client import start_http_server

        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_port

    def close(self) -> None:
        if getattr(self, "_http", None) is not None:
            self._http.shutdown()
            self._http.server_close()


class _ModelStatsCollector:
    """Gauges read from the model process at scrape time."""

    def __init__(self, model_stats: Callable[[], dict]):
        self._stats = model_stats

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            stats = self._stats()
        except Exception:  # noqa: BLE001 - a dead model process: no gauges (health says NOT_SERVING)
            return
        gauges = (("outputs_in_use", "encoder_outputs_in_use_bytes", "response bytes held in the shared output arena"),
                  ("tiles_in_use", "encoder_tiles_in_use_bytes", "pixel bytes waiting in the shared tile arena"),
                  ("cache_bytes", "encoder_cache_bytes", "embedding rows resident in the cache"),
                  ("cache_entries", "encoder_cache_entries", "items resident in the embedding cache"),
                  ("pending_vit_tokens", "encoder_pending_vit_tokens",
                   "ViT tokens admitted and not yet encoded (autoscaling signal)"),
                  ("gpu_memory_allocated", "encoder_gpu_memory_allocated_bytes", "GPU memory allocated by the model process"),
                  ("gpu_memory_reserved", "encoder_gpu_memory_reserved_bytes", "GPU memory reserved by the model process"))
        counters = (("cache_hits", "encoder_cache_hits", "items answered from the embedding cache"),
                    ("cache_joins", "encoder_cache_joins", "items answered by an identical item encoded at the same time"),
                    ("cache_inserts", "encoder_cache_inserts", "items added to the embedding cache"),
                    ("cache_evictions", "encoder_cache_evictions", "items evicted from the embedding cache"),
                    ("jobs_started", "encoder_jobs_started", "distinct items sent to preprocessing and the device"),
                    ("device_busy_s", "encoder_device_busy_seconds", "seconds the device had a batch in flight"))
        for key, name, help_text in gauges:
            if key in stats:
                yield GaugeMetricFamily(name, help_text, value=stats[key])
        for key, name, help_text in counters:
            if key in stats:
                yield CounterMetricFamily(name, help_text, value=stats[key])


class _LeaseCollector:
    """Rows by reference: leases (read at scrape time)."""

    def __init__(self, answers):
        self._answers = answers

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield CounterMetricFamily("encoder_by_reference_inline", "by-reference requests answered inline (NIXL "
                                  "off, or over the tenant's lease budget)", value=self._answers.by_reference_inline)
        leases = self._answers.leases
        if leases is None:
            return
        stats = leases.stats
        yield GaugeMetricFamily("encoder_leases_active", "answers whose rows are held for a NIXL reader",
                                value=stats.active)
        yield GaugeMetricFamily("encoder_lease_bytes", "row bytes held under lease", value=stats.bytes)
        ended = CounterMetricFamily("encoder_leases", "leases granted, and how they ended", labels=["outcome"])
        for outcome in ("granted", "released", "expired", "refused"):
            ended.add_metric([outcome], getattr(stats, outcome))
        yield ended


class RayEncoderMetrics:
    """The same request metrics through ray.util.metrics (a Serve replica)."""

    def __init__(self, replica: str):
        from ray.util import metrics

        tags = {"replica": replica}
        self.requests = metrics.Counter("encoder_requests", "Encode calls by gRPC status", tag_keys=("replica", "code"))
        self.latency = metrics.Histogram("encoder_request_seconds", "Encode latency in the replica",
                                         boundaries=list(LATENCY_BUCKETS_S), tag_keys=("replica",))
        self.stage = metrics.Histogram("encoder_stage_seconds", "Encode time per stage",
                                       boundaries=list(LATENCY_BUCKETS_S), tag_keys=("replica", "stage"))
        self.tokens = metrics.Counter("encoder_tokens_out", "embedding rows sent", tag_keys=("replica",))
        self.bytes_out = metrics.Counter("encoder_bytes_out", "response bytes sent", tag_keys=("replica",))
        self.refused = metrics.Counter("encoder_refused", "calls turned away by admission control",
                                       tag_keys=("replica",))
        for m in (self.requests, self.latency, self.stage, self.tokens, self.bytes_out, self.refused):
            m.set_default_tags(tags)

    def refusal(self) -> None:
        self.refused.inc()

    def record(self, code: str, seconds: float, stats: dict | None = None, items: int = 0, tokens: int = 0,
               nbytes: int = 0, serialize_s: float = 0.0) -> None:
        self.requests.inc(1, {"code": code})
        self.latency.observe(seconds)
        if code != "OK":
            return
        for stage in ("queue", "preprocess", "forward"):
            if stats and f"{stage}_ms" in stats:
                self.stage.observe(stats[f"{stage}_ms"] / 1e3, {"stage": stage})
        self.stage.observe(serialize_s, {"stage": "serialize"})
        if tokens:
            self.tokens.inc(tokens)
        if nbytes:
            self.bytes_out.inc(nbytes)
