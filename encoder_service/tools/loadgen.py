"""`encoder-service bench`: load on any running deployment (standalone server, Serve proxy, TLS), with a
live progress line and a final table.

Closed loop (`concurrency` callers, each sending its next request when the last one answers) or a
fixed rate (`rate` requests per second, open loop: late answers do not slow arrivals). Requests hold
`images_per_request` items from the user's files or a built-in mix of photo-like sizes; each built-in
image is new (the pool's cache answers nothing unless `repeat` is set). Reported: requests/s,
tiles/s, MB/s of embeddings, p50/p90/p99 latency, errors by gRPC status (after the client's retry policy,
`client.retry`) and the retries it made.
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
from PIL import Image

from encoder_service.client.endpoint import EncoderClient
from encoder_service.contract.media import MediaInput, Modality

MIX = [(640, 480), (1920, 1080), (512, 512), (300, 800), (1024, 1024), (200, 200), (1280, 720), (800, 1200)]


@dataclass
class LoadConfig:
    address: str
    duration_s: float = 30.0
    concurrency: int = 8  # closed loop: callers in flight
    rate: float = 0.0  # > 0: open loop at this many requests per second
    images_per_request: int = 2
    files: list[str] = field(default_factory=list)  # the user's images; none: the built-in mix
    repeat: bool = False  # the built-in mix: reuse a fixed set of images (measures the cache) instead of new ones
    timeout_s: float = 120.0


class Images:
    """Where requests' images come from: the user's files in turn, or new random JPEGs of the mix."""

    def __init__(self, cfg: LoadConfig):
        self.cfg = cfg
        self._files = [open(path, "rb").read() for path in cfg.files]
        self._rng = np.random.default_rng()
        self._lock = threading.Lock()
        self._count = 0  # images made (cycles the mix's sizes)
        self._next = 0  # next image of a fixed set
        self._fixed = [self._new() for _ in range(16)] if cfg.repeat and not cfg.files else []

    def _new(self) -> bytes:
        with self._lock:
            w, h = MIX[self._count % len(MIX)]
            self._count += 1
            pixels = self._rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    def request(self, n: int) -> list[MediaInput]:
        pool = self._files or self._fixed
        if not pool:
            return [MediaInput(Modality.IMAGE, self._new()) for _ in range(n)]
        with self._lock:
            start, self._next = self._next, self._next + n
        return [MediaInput(Modality.IMAGE, pool[(start + i) % len(pool)]) for i in range(n)]


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    tiles: int = 0
    nbytes: int = 0
    errors: Counter = field(default_factory=Counter)
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, seconds: float, tiles: int, nbytes: int) -> None:
        with self.lock:
            self.latencies.append(seconds)
            self.tiles += tiles
            self.nbytes += nbytes

    def failed(self, code: str) -> None:
        with self.lock:
            self.errors[code] += 1


def run(cfg: LoadConfig, client: EncoderClient, progress=sys.stderr) -> dict:
    """Apply the load for `duration_s`; the summary (also printed live to `progress` when a terminal)."""
    images, tally = Images(cfg), Tally()
    retries_before = client.retries  # the client's retry policy (`client.retry`) may have retried calls
    end = time.monotonic() + cfg.duration_s
    started = time.monotonic()

    def one() -> None:
        items = images.request(cfg.images_per_request)
        t0 = time.perf_counter()
        try:
            result = client.encode(items, timeout=cfg.timeout_s, copy=False)
        except grpc.RpcError as e:
            tally.failed(e.code().name)
            return
        tally.ok(time.perf_counter() - t0, sum(i.num_tiles for i in result.items),
                 result.embeddings.numel() * result.embeddings.element_size())

    def closed_loop() -> None:
        while time.monotonic() < end:
            one()

    stop = threading.Event()
    reporter = threading.Thread(target=_report_live, args=(tally, started, cfg.duration_s, stop, progress), daemon=True)
    if progress is not None and progress.isatty():
        reporter.start()
    if cfg.rate > 0:
        with ThreadPoolExecutor(max(64, int(cfg.rate * 4))) as pool:
            next_at = time.monotonic()
            while next_at < end:
                time.sleep(max(0.0, next_at - time.monotonic()))
                pool.submit(one)
                next_at += 1.0 / cfg.rate
    else:
        threads = [threading.Thread(target=closed_loop) for _ in range(cfg.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    stop.set()
    if reporter.is_alive():
        reporter.join()
    tally.retries = client.retries - retries_before
    return summary(tally, time.monotonic() - started, cfg)


def summary(tally: Tally, elapsed: float, cfg: LoadConfig) -> dict:
    lat = sorted(tally.latencies)

    def pct(q: float) -> float | None:
        return round(1e3 * lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None

    return {
        "address": cfg.address, "mode": f"open loop {cfg.rate:g}/s" if cfg.rate > 0 else f"closed loop x{cfg.concurrency}",
        "seconds": round(elapsed, 2), "requests": len(lat), "requests_per_s": round(len(lat) / elapsed, 2),
        "tiles_per_s": round(tally.tiles / elapsed, 1), "mb_per_s": round(tally.nbytes / elapsed / 1e6, 2),
        "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99),
        "mean_ms": round(1e3 * statistics.mean(lat), 1) if lat else None, "errors": dict(tally.errors),
        "retries": tally.retries,
    }


def _report_live(tally: Tally, started: float, duration: float, stop: threading.Event, out) -> None:
    width = 30
    while not stop.wait(0.5):
        elapsed = time.monotonic() - started
        done = min(1.0, elapsed / duration)
        bar = "#" * int(done * width) + "-" * (width - int(done * width))
        with tally.lock:
            n, errors = len(tally.latencies), sum(tally.errors.values())
            p50 = 1e3 * statistics.median(tally.latencies[-200:]) if tally.latencies else 0.0
        print(f"\r[{bar}] {elapsed:5.1f}s {n / max(elapsed, 1e-9):7.1f} req/s p50 {p50:7.1f} ms errors {errors}",
              end="", file=out, flush=True)
    print(file=out)


def table(report: dict) -> str:
    rows = [("requests/s", report["requests_per_s"]), ("tiles/s", report["tiles_per_s"]), ("MB/s", report["mb_per_s"]),
            ("p50 ms", report["p50_ms"]), ("p90 ms", report["p90_ms"]), ("p99 ms", report["p99_ms"]),
            ("requests", report["requests"]), ("errors", json.dumps(report["errors"]) if report["errors"] else "none"),
            ("retries", report["retries"])]
    return "\n".join([f"{report['address']}, {report['mode']}, {report['seconds']} s"] +
                     [f"  {name:<11} {value}" for name, value in rows])
