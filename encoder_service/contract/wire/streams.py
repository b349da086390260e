"""EncodeStream on the wire: an Encode answered item by item, and put back together.

The server sends a StreamStart (every item's row count, so the whole tensor can be allocated at once,
and the model's contract digest, checked before any row is used), then each item's rows as soon as they
are ready (in completion order, in chunks of at most `chunk_bytes`, the first carrying the item's
metadata), then a StreamEnd with Encode's response minus the tensor bytes. `StreamAssembler` gives back
exactly what `Encode` gives (one tensor, split by counts), bit for bit, and refuses a stream that ended
early or whose chunks do not tile the tensor.

Item chunks are framed by hand (`item_messages`): the rows are copied once, GIL-free, from where they
live into the message bytes, as `responses.response_bytes` does for the unary response.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from encoder_service.contract.result import EncodeResult, ItemEmbedding, running_offsets
from encoder_service.contract.wire.protobuf import length_prefixed, split_field
from encoder_service.contract.wire.responses import item_from_proto, result_from_parts
from encoder_service.contract.wire.tensors import PB_TO_TORCH, TORCH_TO_PB, bytes_of
from encoder_service.proto import encoder_pb2 as pb

# Rows per message at most this many bytes: large items stream as several messages, so the first rows of
# a long video move while the rest are framed; per-message costs dominate small messages (bench/RESULTS.md,
# progressive_prefill: 16 MB beat 4 MB over one connection, 1 MB was far slower). Keep it under 32 MiB:
# a client's process, as glibc leaves it, maps each larger buffer afresh (bench/RESULTS.md, latency_breakdown).
DEFAULT_CHUNK_BYTES = 16 << 20

ROWS_FIELD = 2  # EncodeStreamResponse.rows
ROWS_DATA_FIELD = 5  # ItemRows.data


class IncompleteStream(RuntimeError):
    """The stream ended (or broke) before every row and the StreamEnd arrived, or was inconsistent."""


# ------------------------------------------------------------------ server side


def start_message(request_id: str, dtype: torch.dtype, hidden_size: int, token_counts: list[int],
                  model: str) -> bytes:
    start = pb.StreamStart(request_id=request_id, dtype=TORCH_TO_PB[dtype], hidden_size=hidden_size,
                           token_counts=token_counts, model=model)
    return pb.EncodeStreamResponse(start=start).SerializeToString()


def item_messages(index: int, metadata: bytes, rows: torch.Tensor, row_bytes: int,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """Serialised EncodeStreamResponse messages carrying one item's rows (`rows`: flat uint8, where they
    live; `metadata`: its serialised ItemMetadata, whose offset is the item's first row)."""
    start = pb.ItemMetadata.FromString(metadata).offset
    total = rows.numel() // row_bytes
    per_chunk = max(1, chunk_bytes // row_bytes)
    out = []
    for first in range(0, max(total, 1), per_chunk):
        count = min(per_chunk, total - first)
        head = pb.ItemRows(item_index=index, row_start=start + first, row_count=count)
        if first == 0:
            head.item.ParseFromString(metadata)
        size = count * row_bytes
        inner = head.SerializeToString() + length_prefixed(ROWS_DATA_FIELD, size)
        prefix = length_prefixed(ROWS_FIELD, len(inner) + size) + inner
        out.append(bytes_of(prefix, [rows[first * row_bytes : first * row_bytes + size]]))
    return out


def end_message(header: bytes) -> bytes:
    """`header`: the serialised EncodeResponse without tensor bytes that Encode would send."""
    return pb.EncodeStreamResponse(end=pb.StreamEnd(response=pb.EncodeResponse.FromString(header))).SerializeToString()


# ------------------------------------------------------------------ client side


def parse_message(data: bytes) -> tuple[pb.EncodeStreamResponse, memoryview | None]:
    """One EncodeStream message as received (bytes), its rows left out of protobuf: (the message without
    its rows' bytes, a view of those bytes in `data`; None when the message carries none). Parsing them
    through protobuf would copy every chunk once more. Unusual but valid
    encodings go through the generated parser."""
    view = memoryview(data)
    try:
        span, rest = split_field(view, 0, len(view), ROWS_FIELD)
        if span is None or rest:
            return pb.EncodeStreamResponse.FromString(data), None
        data_span, head = split_field(view, span[0], span[1], ROWS_DATA_FIELD)
        msg = pb.EncodeStreamResponse()
        msg.rows.MergeFromString(head)
        return msg, view[data_span[0] : data_span[1]] if data_span else view[:0]
    except (ValueError, IndexError):
        return pb.EncodeStreamResponse.FromString(data), None


@dataclass
class _Item:
    meta: pb.ItemMetadata | None = None
    filled: int = 0  # rows received


@dataclass
class StreamAssembler:
    """Feed it the stream's messages in order (`add`); each call says which items became complete.

    `copy=False`, like `Encode`'s: when one message carries every row of the answer (one item in one
    chunk, the common small request), the tensor is a read-only view of that message, as a unary
    answer read with copy=False is, instead of a copy into fresh memory; otherwise rows are copied into
    one tensor as they arrive (it cannot be a view of several messages)."""

    copy: bool = True
    embeddings: torch.Tensor | None = None  # allocated (or adopted) when the first rows arrive
    starts: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    model: str = ""
    request_id: str = ""
    _layout: tuple[torch.dtype, int] | None = None  # (dtype, hidden size), from the StreamStart
    _items: list[_Item] = field(default_factory=list)
    _end: pb.EncodeResponse | None = None

    def add(self, msg: pb.EncodeStreamResponse, rows_data=None) -> list[int]:
        """One message of the stream; returns the items it completed. `rows_data`: the rows' bytes when
        they were parsed apart (`parse_message`), else they are read from `msg`."""
        part = msg.WhichOneof("part")
        if part == "start":
            s = msg.start
            self.start(s.request_id, PB_TO_TORCH[s.dtype], s.hidden_size, list(s.token_counts), s.model)
            return []
        if part == "rows":
            r = msg.rows
            return self.rows(r.item_index, r.item if r.HasField("item") else None, r.row_start, r.row_count,
                             r.data if rows_data is None else rows_data)
        if part == "end":
            return self.end(msg.end.response)
        return []  # an empty message: what carries a failure's status through Serve's proxy

    def start(self, request_id: str, dtype: torch.dtype, hidden_size: int, token_counts: list[int], model: str) -> None:
        if self._layout is not None:
            raise IncompleteStream("a second StreamStart")
        self._layout = dtype, hidden_size
        self.counts = list(token_counts)
        self.starts = running_offsets(self.counts)
        self._items = [_Item() for _ in self.counts]
        self.model, self.request_id = model, request_id

    def rows(self, index: int, meta: pb.ItemMetadata | None, row_start: int, row_count: int, data) -> list[int]:
        """Rows [row_start, row_start + row_count) of the tensor, for item `index` (its metadata with its first
        chunk); `data`: their bytes (any buffer)."""
        if self._layout is None:
            raise IncompleteStream("rows before StreamStart")
        if not 0 <= index < len(self._items):
            raise IncompleteStream(f"rows for item {index} of {len(self._items)}")
        item = self._items[index]
        if meta is not None:
            item.meta = meta
        if (item.meta is None or row_start != self.starts[index] + item.filled
                or item.filled + row_count > self.counts[index]):
            raise IncompleteStream(f"item {index}: rows {row_start}+{row_count} out of order or out of its range")
        dtype, hidden = self._layout
        raw = memoryview(data).cast("B")
        if raw.nbytes != row_count * hidden * dtype.itemsize:
            raise IncompleteStream(f"item {index}: {raw.nbytes} bytes for {row_count} rows")
        if self.embeddings is None and not self.copy and row_count and row_count == sum(self.counts):
            self.embeddings = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(row_count, hidden)
        elif row_count:
            rows = self._tensor()[row_start : row_start + row_count]
            rows.view(-1).view(torch.uint8).copy_(torch.frombuffer(raw, dtype=torch.uint8))
        item.filled += row_count
        return [index] if item.filled == self.counts[index] else []

    def _tensor(self) -> torch.Tensor:
        if self.embeddings is None:
            dtype, hidden = self._layout
            self.embeddings = torch.empty((sum(self.counts), hidden), dtype=dtype)
        return self.embeddings

    def end(self, response: pb.EncodeResponse) -> list[int]:
        if self._layout is None:
            raise IncompleteStream("StreamEnd before StreamStart")
        self._end = response
        return []

    def complete(self, index: int) -> bool:
        return self._items[index].meta is not None and self._items[index].filled == self.counts[index]

    def item(self, index: int) -> tuple[ItemEmbedding, torch.Tensor]:
        """A complete item's metadata and rows (a view of the tensor being assembled)."""
        if not self.complete(index):
            raise IncompleteStream(f"item {index} is not complete")
        meta = self._items[index].meta
        return item_from_proto(meta), self._tensor()[self.starts[index] : self.starts[index] + self.counts[index]]

    def result(self) -> EncodeResult:
        """The whole result, as Encode gives it; raises IncompleteStream unless the stream is whole."""
        if self._layout is None or self._end is None:
            raise IncompleteStream("the stream ended before its StreamEnd")
        missing = [i for i in range(len(self._items)) if not self.complete(i)]
        if missing:
            raise IncompleteStream(f"items {missing} incomplete at the stream's end")
        header, embeddings = self._end, self._tensor()
        if [m.token_count for m in header.items] != self.counts or list(header.embeddings.shape) != list(embeddings.shape):
            raise IncompleteStream("the StreamEnd does not match the rows streamed")
        result = result_from_parts(header, embeddings)
        streamed = [item_from_proto(item.meta) for item in self._items]
        if [dataclasses.astuple(a) for a in streamed] != [dataclasses.astuple(b) for b in result.items]:
            raise IncompleteStream("the StreamEnd's item metadata differs from what was streamed")
        return result
