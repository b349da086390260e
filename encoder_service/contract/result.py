"""A finished encode, as every consumer sees it: ONE tensor [sum(n_i), hidden] and per-item metadata.
The tensor is never split on the wire; a consumer splits it by the counts (`split`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from encoder_service.contract.media import SampledFrames
from encoder_service.contract.reference import RowsReference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose {', '.join(DTYPES)}")
    return DTYPES[name]


def running_offsets(counts: list[int]) -> list[int]:
    """Where each item's rows start in the one concatenated tensor."""
    out, acc = [], 0
    for n in counts:
        out.append(acc)
        acc += n
    return out


@dataclass
class ItemEmbedding:
    """What an answer says about one item: where its rows are in the tensor, and how they were made."""

    item_id: str
    content_hash: str  # the request's opaque label, echoed
    offset: int
    token_count: int
    num_tiles: int
    tokens_per_frame: list[int]  # video: rows each frame kept (after EVS a frame may keep 0)
    frame_timestamps: list[float] = field(default_factory=list)
    digest: str = ""  # the media digest the server computed (send it instead of the bytes next time)
    cache_hit: bool = False
    frame_indices: list[int] = field(default_factory=list)  # encoded_video: in the stream
    video_fps: float = 0.0  # encoded_video: the stream's average rate
    cached: bool = False  # the rows are in the server's cache after the call (a fetch by digest finds them)


@dataclass
class EncodeResult:
    """One tensor, split by counts on demand.

    A result read from the wire with `copy=False` holds a read-only view of the received bytes (or of
    Ray's object store): clone what you keep and never write to it.
    """

    request_id: str
    embeddings: torch.Tensor  # [sum(token_count), hidden]
    items: list[ItemEmbedding]
    extras: dict = field(default_factory=dict)  # the server's timings and the model's contract digest
    # Rows by reference (`reference.RowsReference`): the answer's rows are still at the endpoint and
    # `embeddings` is [0, hidden] until a reader fills it (`transfer.reader`).
    reference: RowsReference | None = None

    @property
    def token_counts(self) -> list[int]:
        return [i.token_count for i in self.items]

    @property
    def offsets(self) -> list[int]:
        return [i.offset for i in self.items]

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.embeddings.shape)

    def split(self) -> list[torch.Tensor]:
        return [self.embeddings[i.offset : i.offset + i.token_count] for i in self.items]


def assemble(parts: list[EncodeResult], request_id: str = "", groups: list[list[int]] | None = None) -> EncodeResult:
    """Results of several calls (e.g. one per item, each routed to its own replica) as the one result a
    single call would give: one tensor [sum(n_i), hidden] of its own, items in order, offsets into it.
    `groups[k]`: the request's indices of part k's items (default: the parts' items one after another)."""
    if groups is None:
        if len(parts) == 1:
            return parts[0]
        starts = running_offsets([len(p.items) for p in parts])
        groups = [list(range(start, start + len(p.items))) for start, p in zip(starts, parts)]
    slots: list[tuple[ItemEmbedding, torch.Tensor] | None] = [None] * sum(len(g) for g in groups)
    for part, group in zip(parts, groups):
        for i, item, rows in zip(group, part.items, part.split()):
            slots[i] = item, rows
    offsets = running_offsets([item.token_count for item, _ in slots])
    items = [dataclasses.replace(item, offset=offset) for (item, _), offset in zip(slots, offsets)]
    return EncodeResult(request_id or parts[0].request_id, torch.cat([rows for _, rows in slots]), items,
                        {**parts[0].extras, "parts": [p.extras for p in parts]})


def describe_item(offset: int, token_count: int, num_tiles: int, tokens_per_frame: list[int],
                  frames: SampledFrames | None = None, digest: str = "", cache_hit: bool = False, item_id: str = "",
                  content_hash: str = "", cached: bool = False) -> ItemEmbedding:
    """An item's metadata as an answer gives it (`frames`: a video container's sampled frames)."""
    return ItemEmbedding(item_id, content_hash, offset, token_count, num_tiles, list(tokens_per_frame),
                         list(frames.times) if frames else [], digest, cache_hit,
                         list(frames.indices) if frames else [], frames.fps if frames else 0.0, cached)
