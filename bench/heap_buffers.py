"""What keeping large buffers in the heap (`serving.heap`) costs and buys under load: the server's
memory (RSS of the server and its children: idle, peak, after) and its throughput, side by side with
glibc's default (`--mmap-large-buffers`), one server after the other on the same checkpoint.

`--clients` threads each send requests of 1-4 images of the serving mix (answers from 5 to 270 MB on
tiny-5120) for `--duration` s, unary, rows read in place. The client process keeps glibc's default in
both runs, so only the server's setting differs.

    python -m bench.heap_buffers --preset tiny-5120 --clients 4 --duration 20
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import IMAGE_MIXES, device_name, jpeg_mix, preset_checkpoint
from bench.served_throughput import as_items, standalone_server_process
from encoder_service.client.endpoint import EncoderClient


def _tree_rss_mb(pid: int) -> float:
    """RSS of `pid` and its descendants (Linux /proc), MB. Shared memory counts once per process that
    touched it, so arenas are over-counted alike in both runs."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def load(address: str, images: list[bytes], clients: int, duration: float, server_pid: int) -> dict:
    stop = time.monotonic() + duration
    done = {"calls": 0, "mb": 0.0}
    lock = threading.Lock()

    def client_loop(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with EncoderClient(address, timeout=300) as client:
            while time.monotonic() < stop:
                pick = rng.choice(len(images), size=int(rng.integers(1, 5)), replace=False)
                out = client.encode(as_items([images[i] for i in pick]), copy=False)
                with lock:
                    done["calls"] += 1
                    done["mb"] += out.embeddings.numel() * out.embeddings.element_size() / 1e6

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    peak = 0.0
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, _tree_rss_mb(server_pid))
        time.sleep(0.1)
    return {"calls_per_s": done["calls"] / duration, "mb_per_s": done["mb"] / duration, "rss_peak_mb": peak}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny-5120")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--preprocess-workers", type=int, default=2)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--malloc", default="mmap,heap")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    checkpoint = str(preset_checkpoint(args.preset, Path(args.workdir or tempfile.mkdtemp(prefix="bench-"))))
    images = jpeg_mix(len(IMAGE_MIXES["serving"]), seed=7)
    print(json.dumps({"bench": "heap_buffers", "device": device_name(torch.device(args.device)), "cpus": os.cpu_count(),
                      "preset": args.preset, "clients": args.clients, "duration_s": args.duration}), flush=True)
    for malloc in args.malloc.split(","):
        extra = ("--mmap-large-buffers",) if malloc == "mmap" else ()
        with standalone_server_process(checkpoint, args, extra=extra) as (address, proc):
            pid = proc.pid
            with EncoderClient(address, timeout=300) as warm:
                warm.encode(as_items(images[:1]))
            idle = _tree_rss_mb(pid)
            row = load(address, images, args.clients, args.duration, pid)
            time.sleep(1.0)
            row = {"malloc": malloc, "rss_idle_mb": idle, **row, "rss_after_mb": _tree_rss_mb(pid)}
            print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
