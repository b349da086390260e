"""The ceiling of any gRPC path on this machine: moving one large message per call, no model.

A grpc.aio server (the options `wire.channel_options` sets) answers every call with an
`--mb` MB payload built as the encoder server builds responses (a fresh `bytes`, filled
without the GIL), either as one unary message or as a server stream of `--chunk-mb` chunks
that the client copies into one tensor when there are several (`stream`: read on the calling thread, as `EncoderClient` reads
streams; `stream-handoff`: gRPC's default, each message handed over from its channel thread), or (`--split`) as N unary calls of 1/N each on N TCP
connections at once, copied into one tensor: what spreading one answer over connections buys.
Clients are separate processes; reported: MB/s over all clients and the median time of one message.
`--option name=value` adds a gRPC channel argument on both sides (to try transport settings).
`--malloc mmap,heap`: every run once per malloc setting of the server and client processes, side by
side: glibc as it is, then large buffers kept in the heap (`serving.heap`).

    python -m bench.grpc_transport [--mb 31 --clients 1,16 --split 2,4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import grpc.experimental
import torch

from encoder_service.contract.wire.channel import channel_options
from encoder_service.serving.heap import keep_large_buffers_in_heap


def _payload(nbytes: int) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8)


def serve(port_out: mp.Queue, nbytes: int, chunk: int, options: list, heap: bool = False) -> None:
    from encoder_service.contract.wire.tensors import bytes_of

    if heap:
        keep_large_buffers_in_heap()
    data = _payload(nbytes)

    async def main() -> None:
        server = grpc.aio.server(options=options)

        async def unary(request, context):
            part, parts = (int(x) for x in request.decode().split("/")) if request else (0, 1)
            piece = data[part * nbytes // parts : (part + 1) * nbytes // parts]
            return await asyncio.get_running_loop().run_in_executor(None, bytes_of, b"", [piece])

        async def stream(request, context):  # framed off the event loop, as the encoder server frames rows
            for start in range(0, nbytes, chunk):
                yield await asyncio.get_running_loop().run_in_executor(None, bytes_of, b"", [data[start : start + chunk]])

        handlers = {"Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(stream)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Transport", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_out.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def client(port: int, mode: str, nbytes: int, start_at: float, end_at: float, out: mp.Queue, options: list,
           split: int = 1, heap: bool = False) -> None:
    if heap:
        keep_large_buffers_in_heap()
    # Separate subchannel pools: channels sharing the global one would share one TCP connection.
    if mode == "stream":
        options = options + [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=options + [("grpc.use_local_subchannel_pool", 1)])
                for _ in range(split)]
    unary, stream = channels[0].unary_unary("/bench.Transport/Unary"), channels[0].unary_stream("/bench.Transport/Stream")
    parts = [channel.unary_unary("/bench.Transport/Unary") for channel in channels]
    lanes = ThreadPoolExecutor(split)

    def receive() -> int:
        if mode == "unary":
            return len(unary(b""))
        if mode == "split":
            dest = torch.empty(nbytes, dtype=torch.uint8)

            def part(k: int) -> int:
                data = parts[k](f"{k}/{split}".encode())
                dest[k * nbytes // split : k * nbytes // split + len(data)].copy_(torch.frombuffer(data, dtype=torch.uint8))
                return len(data)

            return sum(lanes.map(part, range(split)))
        # As `StreamAssembler(copy=False)`: an answer in one message is used in place (as unary's is), one
        # in several is copied into one tensor as its messages arrive.
        first, dest, pos = None, None, 0
        for part in stream(b""):
            if first is None:
                first = part
            else:
                if dest is None:
                    dest = torch.empty(nbytes, dtype=torch.uint8)
                    dest[: len(first)].copy_(torch.frombuffer(first, dtype=torch.uint8))
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
    p.add_argument("--split", default="", help="also: one message as N calls on N connections, e.g. 2,4")
    p.add_argument("--modes", default="unary,stream,stream-handoff")
    p.add_argument("--option", action="append", default=[], help="gRPC channel argument name=value (int or str)")
    p.add_argument("--malloc", default="mmap", help="mmap (glibc as it is), heap (serving.heap), or both: mmap,heap")
    args = p.parse_args()
    nbytes, chunk = int(args.mb * 1e6), int(args.chunk_mb * 1e6)
    extra = [(k, int(v) if v.lstrip("-").isdigit() else v) for k, v in (o.split("=", 1) for o in args.option)]
    options = channel_options() + extra
    ctx = mp.get_context("spawn")
    runs = [(mode, 1) for mode in args.modes.split(",")] + [("split", int(k)) for k in args.split.split(",") if k]
    for malloc in args.malloc.split(","):
        heap = malloc == "heap"
        port_q = ctx.Queue()
        server = ctx.Process(target=serve, args=(port_q, nbytes, chunk, options, heap), daemon=True)
        server.start()
        run_clients(ctx, port_q.get(timeout=60), runs, nbytes, options, extra, heap, args)
        server.kill()


def run_clients(ctx, port: int, runs: list, nbytes: int, options: list, extra: list, heap: bool, args) -> None:
    for mode, split in runs:
        for n in map(int, args.clients.split(",")):
            out = ctx.Queue()
            start_at = time.time() + 3 + 0.2 * n
            procs = [ctx.Process(target=client, args=(port, mode, nbytes, start_at, start_at + args.duration, out,
                                                      options, split, heap))
                     for _ in range(n)]
            for proc in procs:
                proc.start()
            parts = [out.get(timeout=120) for _ in procs]
            for proc in procs:
                proc.join()
            times = [t for ts, _ in parts for t in ts]
            print(json.dumps({"bench": "grpc_transport", "cpus": os.cpu_count(), "malloc": "heap" if heap else "mmap",
                              "mode": mode, "clients": n,
                              "message_mb": args.mb, "chunk_mb": args.chunk_mb if mode.startswith("stream") else None, "connections": split,
                              "options": dict(extra),
                              "mb_per_s": round(sum(m for _, m in parts) / args.duration / 1e6),
                              "median_ms": round(1e3 * statistics.median(times), 1) if times else None}), flush=True)


if __name__ == "__main__":
    main()
