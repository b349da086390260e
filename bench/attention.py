"""Ragged attention backends side by side: ms per call and error against an fp32 reference.

Every backend registered in encoder_service.attention (plus `auto`) runs the same random
bf16 q/k/v for each case: single sequences of 128..8192 tokens (RADIO-H: 1280 wide, 16
heads x 80), a batch of 16 tiles (1029 tokens: 1024 patches + 5 prefix), the sequence
lengths dynamic-resolution images of the serving mix produce, and a ~33k-token mix of
256..8192. Two times per call:
  gpu_ms  - device time of one run() with the host far ahead (the GPU is first kept busy,
            then 32 runs are queued), as inside a forward where matmuls dominate;
  wall_ms - plan() + 32 runs back to back, per run, host overhead included.
`auto` is reported with the backend it chose and its ratio to the best single backend (gpu_ms).

    python -m bench.attention               # CUDA; on CPU only `torch` runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import IMAGE_MIXES, device_name
from encoder_service.attention import BACKENDS, AttentionSpec, available_backends, get_backend, reference_attention
from encoder_service.contract.tokens import DynamicResolution, dynamic_patch_grid

LAYERS = 32


def cases(heads_prefix: int = 5) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(0)
    mixed, total = [], 0
    while total < 33000:
        n = int(torch.randint(256, 8193, (1,), generator=gen))
        mixed.append(n)
        total += n
    spec = DynamicResolution(patch_size=16, downsample=2, min_num_patches=1024, max_num_patches=13312)
    dynamic = [r * c + heads_prefix for r, c in (dynamic_patch_grid(w, h, spec) for w, h in IMAGE_MIXES["serving"])]
    out = {f"1 x {n}": [n] for n in (128, 256, 512, 1024, 2048, 4096, 8192)}
    out["4 x 1029 (tiles)"] = [1029] * 4
    out["16 x 1029 (tiles)"] = [1029] * 16
    out["dynamic-res batch"] = [n for n in dynamic if n < 8000][:6]
    out["dynamic-res 1920x1080"] = [dynamic[1]]
    out[f"mix {len(mixed)} seqs, {total} tok"] = mixed
    return out


def time_backend(backend, lengths: list[int], q, k, v, repeats: int) -> tuple[float, float]:
    indptr = F.pad(torch.tensor(lengths).cumsum(0), (1, 0))
    plan = backend.plan(indptr, q.shape[1], q.shape[2])
    for _ in range(3):
        backend.run(plan, q, k, v)
    torch.cuda.synchronize()
    gpu, wall = [], []
    for _ in range(repeats):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of device work: the host queues everything below meanwhile
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(LAYERS):
            backend.run(plan, q, k, v)
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end) / LAYERS)
        t0 = time.perf_counter()
        plan = backend.plan(indptr, q.shape[1], q.shape[2])
        for _ in range(LAYERS):
            backend.run(plan, q, k, v)
        torch.cuda.synchronize()
        wall.append(1e3 * (time.perf_counter() - t0) / LAYERS)
    return statistics.median(gpu), statistics.median(wall)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=80)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.attention compares GPU kernels: run it on a CUDA machine")
    device = torch.device("cuda", torch.cuda.current_device())
    spec = AttentionSpec(device, args.heads, args.head_dim, torch.bfloat16)
    found = available_backends(spec)
    backends = {n: b for n, b in found.items() if not isinstance(b, str)}
    unavailable = {n: b for n, b in found.items() if isinstance(b, str)}
    auto = get_backend("auto", spec)
    header = {"bench": "attention", "device": device_name(device), "heads": args.heads, "head_dim": args.head_dim,
              "dtype": "bfloat16", "backends": list(backends), "unavailable": unavailable, "registered": list(BACKENDS)}
    print(json.dumps(header), flush=True)
    rows = []
    for name, lengths in cases().items():
        gen = torch.Generator().manual_seed(len(rows))
        q, k, v = (torch.randn(sum(lengths), args.heads, args.head_dim, generator=gen) for _ in range(3))
        want = reference_attention(q.to(device), k.to(device), v.to(device), lengths)
        qd, kd, vd = (t.to(device, torch.bfloat16).contiguous() for t in (q, k, v))
        row = {"case": name, "sequences": len(lengths), "tokens": sum(lengths), "gpu_ms": {}, "wall_ms": {}, "rel_err": {}}
        for bname, backend in list(backends.items()) + [("auto", auto)]:
            indptr = F.pad(torch.tensor(lengths).cumsum(0), (1, 0))
            got = backend.run(backend.plan(indptr, args.heads, args.head_dim), qd, kd, vd).float()
            row["rel_err"][bname] = float(f"{((got - want).norm() / want.norm()).item():.2e}")
            row["gpu_ms"][bname], row["wall_ms"][bname] = (round(x, 3) for x in time_backend(backend, lengths, qd, kd, vd, args.repeats))
        row["auto_chose"] = auto.choose(lengths)
        best = min(row["gpu_ms"][b] for b in backends)
        row["best"] = min(backends, key=lambda b: row["gpu_ms"][b])
        row["auto_over_best"] = round(row["gpu_ms"]["auto"] / best, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    names = list(backends) + ["auto"]
    print("\n| case | " + " | ".join(names) + " | auto chose | auto / best |")
    print("|---|" + "---|" * (len(names) + 2))
    for r in rows:
        cells = [f"{r['gpu_ms'][n]:.3f}" + (" *" if n == r["best"] else "") for n in names]
        print(f"| {r['case']} | " + " | ".join(cells) + f" | {r['auto_chose']} | {r['auto_over_best']:.2f} |")
    print(f"\nmax auto / best: {max(r['auto_over_best'] for r in rows):.3f}; "
          f"max rel. error vs fp32: {max(e for r in rows for e in r['rel_err'].values()):.2e}")


if __name__ == "__main__":
    main()
