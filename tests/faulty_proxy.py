"""A TCP proxy that misbehaves on purpose, between a consumer and the pool: it delays bytes, drops
connections (stops forwarding without a word: a black hole) and resets them (RST), at random, by the rates
it is given. Faults hit whole connections, as networks do; gRPC clients reconnect through it."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from dataclasses import dataclass


@dataclass
class Faults:
    delay_s: float = 0.0  # added before each chunk is forwarded, either way
    reset: float = 0.0  # per chunk: the connection is reset (RST) instead of forwarding it
    drop: float = 0.0  # per chunk: the connection stops forwarding, both ways, and stays open


class FaultyProxy:
    def __init__(self, target: str, faults: Faults, seed: int | None = None):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.faults = faults
        self.rng = random.Random(seed)
        self.counts = {"connections": 0, "resets": 0, "drops": 0}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faulty-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counts["connections"] += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        state = {"dropped": False}
        await asyncio.gather(self._pipe(reader, up_writer, writer, state), self._pipe(up_reader, writer, up_writer, state),
                             return_exceptions=True)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, other: asyncio.StreamWriter,
                    state: dict) -> None:
        try:
            while chunk := await source.read(65536):
                if self.faults.delay_s:
                    await asyncio.sleep(self.faults.delay_s)
                roll = self.rng.random()
                if roll < self.faults.reset:
                    self.counts["resets"] += 1
                    for writer in (sink, other):
                        _reset(writer)
                    return
                if roll < self.faults.reset + self.faults.drop:
                    self.counts["drops"] += 1
                    state["dropped"] = True
                if state["dropped"]:
                    continue  # a black hole: bytes go nowhere, nothing is closed
                sink.write(chunk)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()

    def close(self) -> None:
        """Stop listening, cut every connection, and end the loop with nothing of it left pending."""
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer or a middlebox does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
