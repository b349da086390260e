"""EncodeStream on the serving side: a streamed call on the model process as events, and those events as
the stream's messages (`contract.wire.streams` frames them). Used by the standalone server and the Serve
deployment alike."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator

import torch

from encoder_service.contract.wire.streams import DEFAULT_CHUNK_BYTES, end_message, item_messages, start_message
from encoder_service.serving.host.model_process import SharedReply


async def model_events(model, request: bytes, deadline: float | None, namespace: str = "",
                       extras: dict | None = None) -> AsyncIterator:
    """A streamed call on a `ModelProcess`, as an async iterator: the start event, each item's event (its
    `rows` readable until the iterator is closed), then the finished `SharedReply` (its rows already given
    back: read its header only). Failures raise as `ModelProcess.submit`'s future would; closing the
    iterator early cancels the call. Every item's rows go back when it ends, whatever the outcome."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    future = model.submit(request, deadline, extras, namespace,
                          on_event=lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
    future.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, None))
    released = False
    try:
        while (event := await events.get()) is not None:
            yield event
        reply = await asyncio.wrap_future(future)  # cancelled here: the finally below gives the rows back
        model.release(reply)
        released = True
        yield reply
    finally:
        # Closed early (the client hung up): the call is cancelled, or, if it had finished, its answer's rows
        # go back here (nobody will read them).
        if not future.cancel() and not released and future.exception() is None:
            model.release(future.result())
        model.release_items(future.call_id)


@dataclass
class StreamTally:
    """What `wire_messages` sent: the item messages' bytes, the time spent framing rows, the finished call."""

    sent: int = 0
    serialize_s: float = 0.0
    reply: SharedReply | None = None


async def wire_messages(events: AsyncIterator, dtype: torch.dtype, hidden_size: int,
                        chunk_bytes: int = DEFAULT_CHUNK_BYTES, executor=None,
                        tally: StreamTally | None = None) -> AsyncIterator[bytes]:
    """A streamed call's events (`model_events`) as its EncodeStream messages: the StreamStart, each item's
    rows (framed on `executor`, off the event loop), the StreamEnd."""
    tally = tally if tally is not None else StreamTally()
    loop = asyncio.get_running_loop()
    async for event in events:
        if isinstance(event, SharedReply):  # the finished call, after every item
            tally.reply = event
            yield end_message(event.header)
        elif event.token_counts is not None:
            yield start_message(event.request_id, dtype, hidden_size, event.token_counts, event.model)
        else:
            framing_from = time.perf_counter()
            messages = await loop.run_in_executor(executor, item_messages, event.index, event.metadata, event.rows,
                                                  hidden_size * dtype.itemsize, chunk_bytes)
            tally.serialize_s += time.perf_counter() - framing_from
            for message in messages:
                tally.sent += len(message)
                yield message
