"""Moving an answer's rows to a consumer's tensor: bytes in the answer (gRPC unary, gRPC stream, the Serve
handle) against rows by reference (NIXL READ from the endpoint's memory), on cache hits, same node.

A standalone `encoder-service serve --nixl` (tiny-5120: cheap compute, rows as wide as radio-h's, bf16) holds
the items in its cache; each path asks for the same items again and again, interleaved, into a tensor of
the caller's own (copy=True: what a consumer keeps). Per request size (one item of ~2.6 / ~16 / ~34 MB of
rows, four items of ~34 MB: ~136 MB; and 8 items of ~34 MB for the pool-hit figure): median seconds, GB/s,
the ratio to one memcpy of the same bytes into a fresh tensor in one process, CPU seconds per GB in the
server's processes and in this one, and for NIXL the bare transfer (the same reference read again: what the
Encode call adds on top). `--serve-handle` adds the Ray Serve handle path (a one-replica pool).

    python -m bench.row_transfer [--repeats 5 --ucx cma,tcp,self --serve-handle]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import device_name, preset_checkpoint, tree_cpu_s
from encoder_service.client.endpoint import EncoderClient
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.serving.api.serve.local import local_auth
from encoder_service.transfer.reader import shared_reader

# Image sizes -> tiles at 512 px (+ a thumbnail above one tile): 1, 6+1 and 12+1 tiles of 256 rows.
SIZES = {"2.6MB": [(512, 512)], "16MB": [(1536, 1024)], "34MB": [(2048, 1536)], "136MB": [(2048, 1536)] * 4,
         "8x34MB": [(2048, 1536)] * 8}


def png(width: int, height: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def memcpy_s(nbytes: int, allocate=lambda n: torch.empty(n, dtype=torch.uint8)) -> float:
    """One copy of `nbytes` into freshly allocated memory (as a consumer's tensor is), median of 9."""
    source = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    times = []
    for _ in range(9):
        started = time.perf_counter()
        allocate(nbytes).copy_(source)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ucx", default="cma,tcp,self", help="UCX_TLS on both sides (\"\": UCX's choice)")
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--serve-handle", action="store_true")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    if args.ucx:
        os.environ["UCX_TLS"] = args.ucx
    local_auth()  # a server with --nixl requires a token: the children inherit it, this process's clients send it
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-rows-"))
    checkpoint = str(preset_checkpoint("tiny-5120", workdir))
    requests = {name: [MediaInput(Modality.IMAGE, png(w, h, seed=i)) for i, (w, h) in enumerate(SIZES[name])]
                for name in args.sizes.split(",")}
    print(json.dumps({"bench": "row_transfer", "device": device_name(torch.device("cpu")), "cpus": os.cpu_count(),
                      "preset": "tiny-5120", "dtype": "bfloat16", "ucx_tls": args.ucx or "(UCX's choice)",
                      "repeats": args.repeats}), flush=True)
    handle = serve_handle(checkpoint) if args.serve_handle else None  # Ray first: it starts slowly on a busy machine
    server = subprocess.Popen([sys.executable, "-m", "encoder_service.cli", "serve", "--port", "0", "--checkpoint",
                               checkpoint, "--device", "cpu", "--dtype", "bfloat16", "--cache-mb", "2048",
                               "--output-arena-mb", "1024", "--preprocess-workers", "1", "--max-tokens-per-request",
                               str(1 << 20), "--nixl", "--ucx-transports", args.ucx], stdout=subprocess.PIPE,
                              text=True)
    try:
        address = server.stdout.readline().split()[-1]
        # Items go by digest (cache hits): what moves is the rows.
        plain = EncoderClient(address, timeout=600, probe=True)
        nixl = EncoderClient(address, timeout=600, probe=True, transfer="nixl")
        reader = shared_reader()
        paths = {
            "grpc-unary": lambda items: plain.encode(items).embeddings,
            "grpc-stream": lambda items: plain.encode_stream(items).embeddings,
            "nixl": lambda items: nixl.encode(items).embeddings,
        }
        if handle is not None:
            paths["serve-handle"] = handle
        for name, items in requests.items():
            rows = plain.encode(items)  # into the cache (and the warm-up)
            nbytes = rows.embeddings.numel() * rows.embeddings.element_size()
            times: dict[str, list[float]] = {k: [] for k in paths}
            cpu = {k: [0.0, 0.0] for k in paths}
            for path in paths.values():
                path(items)
            for _ in range(args.repeats):
                for key, path in paths.items():
                    server_cpu, own_cpu = tree_cpu_s(server.pid), self_cpu_s()
                    started = time.perf_counter()
                    out = path(items)
                    times[key].append(time.perf_counter() - started)
                    cpu[key][0] += tree_cpu_s(server.pid) - server_cpu
                    cpu[key][1] += self_cpu_s() - own_cpu
                    assert torch.equal(out, rows.embeddings), key
            held = plain.encode(items, rows=pb.ROWS_BY_REFERENCE)  # the bare transfer: one reference read again
            bare = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                reader.read(held.reference, held.dtype, held.shape[1], release=False)
                bare.append(time.perf_counter() - started)
            reader.release(held.reference)
            copy_s = memcpy_s(nbytes)
            gb = nbytes / 1e9
            row = {"request": name, "items": len(items), "mb": round(nbytes / 1e6, 1),
                   "memcpy_ms": round(1e3 * copy_s, 2), "nixl_bare_ms": round(1e3 * statistics.median(bare), 2)}
            for key in paths:
                t = statistics.median(times[key])
                row[key] = {"ms": round(1e3 * t, 2), "gb_per_s": round(gb / t, 2), "x_memcpy": round(t / copy_s, 2),
                            "server_cpu_s_per_gb": round(cpu[key][0] / args.repeats / gb, 2),
                            "client_cpu_s_per_gb": round(cpu[key][1] / args.repeats / gb, 2)}
            row["nixl_speedup_over_unary"] = round(row["grpc-unary"]["ms"] / row["nixl"]["ms"], 2)
            row["nixl_x_bare"] = round(row["nixl"]["ms"] / row["nixl_bare_ms"], 2)
            print(json.dumps(row), flush=True)
        plain.close()
        nixl.close()
    finally:
        server.terminate()
        server.wait(timeout=60)


def serve_handle(checkpoint: str):
    """The Serve handle path on a one-replica local pool (same items, its own cache)."""
    import ray

    from encoder_service.client.pool import PoolClientConfig, PoolEncoderClient
    from encoder_service.serving.api.serve.local import cpu_pool_config, deploy

    local_auth()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    cfg = cpu_pool_config(checkpoint, replicas=1, cache_mb=2048, arena_mb=256, dtype="bfloat16")
    cfg["applications"][0]["args"]["engine"]["max_tokens_per_request"] = 1 << 20
    cfg["applications"][0]["args"]["pipeline"]["output_arena_mb"] = 1024
    deploy(cfg)
    client = PoolEncoderClient(PoolClientConfig(transport="handle", tenant="bench", affinity=False,
                                                retry={"attempt_timeout_s": 600, "total_timeout_s": 600}))
    return lambda items: client.encode(items).embeddings.clone()


if __name__ == "__main__":
    main()
