"""The ceiling of any gRPC path on this machine: moving one large message per call, no model.

A grpc.aio server (the options `wire.channel_options` sets) answers every call with an
`--mb` MB payload built as the encoder server builds responses (a fresh `bytes`, filled
without the GIL), either as one unary message or as a server stream of `--chunk-mb` chunks
that the client copies into one tensor. Clients are separate processes; reported: MB/s
over all clients and the median time of one message.

    python -m bench.grpc_transport [--mb 31 --clients 1,16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import time

import grpc
import torch

from encoder_service.serving.wire import channel_options


def _payload(nbytes: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8)


def serve(port_out: mp.Queue, nbytes: int, chunk: int) -> None:
    from encoder_service.serving.wire import _bytes_of

    data = _payload(nbytes)

    async def main() -> None:
        server = grpc.aio.server(options=channel_options())

        async def unary(request, context):
            return await asyncio.get_running_loop().run_in_executor(None, _bytes_of, b"", [data])

        async def stream(request, context):
            for start in range(0, nbytes, chunk):
                yield _bytes_of(b"", [data[start : start + chunk]])

        handlers = {"Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(stream)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Transport", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_out.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def client(port: int, mode: str, nbytes: int, start_at: float, end_at: float, out: mp.Queue) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options())
    unary, stream = channel.unary_unary("/bench.Transport/Unary"), channel.unary_stream("/bench.Transport/Stream")

    def receive() -> int:
        if mode == "unary":
            return len(unary(b""))
        dest, pos = torch.empty(nbytes, dtype=torch.uint8), 0
        for part in stream(b""):
            dest[pos : pos + len(part)].copy_(torch.frombuffer(part, dtype=torch.uint8))
            pos += len(part)
        return pos

    receive()
    time.sleep(max(0.0, start_at - time.time()))
    times, moved = [], 0
    while time.time() < end_at:
        t0 = time.time()
        n = receive()
        if time.time() <= end_at:
            times.append(time.time() - t0)
            moved += n
    out.put((times, moved))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=float, default=31.0)
    p.add_argument("--chunk-mb", type=float, default=8.0)
    p.add_argument("--clients", default="1,16")
    p.add_argument("--duration", type=float, default=5.0)
    args = p.parse_args()
    nbytes, chunk = int(args.mb * 1e6), int(args.chunk_mb * 1e6)
    ctx = mp.get_context("spawn")
    port_q = ctx.Queue()
    server = ctx.Process(target=serve, args=(port_q, nbytes, chunk), daemon=True)
    server.start()
    port = port_q.get(timeout=60)
    for mode in ("unary", "stream"):
        for n in map(int, args.clients.split(",")):
            out = ctx.Queue()
            start_at = time.time() + 3 + 0.2 * n
            procs = [ctx.Process(target=client, args=(port, mode, nbytes, start_at, start_at + args.duration, out))
                     for _ in range(n)]
            for proc in procs:
                proc.start()
            parts = [out.get(timeout=120) for _ in procs]
            for proc in procs:
                proc.join()
            times = [t for ts, _ in parts for t in ts]
            print(json.dumps({"bench": "grpc_transport", "cpus": os.cpu_count(), "mode": mode, "clients": n,
                              "message_mb": args.mb, "chunk_mb": args.chunk_mb if mode == "stream" else None,
                              "mb_per_s": round(sum(m for _, m in parts) / args.duration / 1e6),
                              "median_ms": round(1e3 * statistics.median(times), 1) if times else None}), flush=True)
    server.kill()


if __name__ == "__main__":
    main()
