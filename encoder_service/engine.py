"""The encoder engine: media items in, ONE embedding tensor [sum(n_i), hidden] + counts out.

request items -> processor (decode, tile) -> batcher (token budget) -> model (ragged ViT +
projector, once per batch) -> one concatenated tensor. The consumer splits by counts.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from encoder_service.attention import get_backend
from encoder_service.batcher import plan_batches
from encoder_service.config import EngineConfig, TilingSpec
from encoder_service.errors import BudgetExceeded, DeadlineExceeded, InvalidInput
from encoder_service.models import load_checkpoint, patchify, tiny_checkpoint_dir
from encoder_service.processor import ImageProcessor, MediaInput, ProcessedItem


@dataclass
class EncodeOutput:
    embeddings: torch.Tensor  # [sum(token_counts), hidden], on CPU
    token_counts: list[int]
    num_tiles: list[int]
    tokens_per_frame: list[list[int]]  # [] for images
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def offsets(self) -> list[int]:
        out, acc = [], 0
        for n in self.token_counts:
            out.append(acc)
            acc += n
        return out

    def split(self) -> list[torch.Tensor]:
        """Per-item views, for consumers and tests (the wire format stays one tensor)."""
        return list(torch.split(self.embeddings, self.token_counts))

    def select(self, first: int, last: int) -> "EncodeOutput":
        """Items [first, last) as their own output: a row view of the one tensor, no copy."""
        rows = sum(self.token_counts[:first]), sum(self.token_counts[:last])
        return EncodeOutput(
            embeddings=self.embeddings[rows[0] : rows[1]],
            token_counts=self.token_counts[first:last],
            num_tiles=self.num_tiles[first:last],
            tokens_per_frame=self.tokens_per_frame[first:last],
            stats=dict(self.stats),
        )


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    hidden_size: int
    dtype: torch.dtype
    patch_size: int
    tiling: TilingSpec
    max_tokens_per_batch: int
    max_tokens_per_request: int
    max_items_per_request: int
    attention_backend: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"unsupported dtype {dtype!r}; choose auto, {', '.join(dtypes)}")
    return dtypes[dtype]


class EncoderEngine:
    def __init__(self, cfg: EngineConfig | None = None):
        self.cfg = cfg = cfg or EngineConfig()
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.model = load_checkpoint(cfg.checkpoint or tiny_checkpoint_dir(), self.device, self.dtype)
        self.processor = ImageProcessor(self.model.cfg.processor)
        self.attention = get_backend(cfg.attention_backend, self.device)
        self._preprocess_pool = ThreadPoolExecutor(max(1, cfg.preprocess_threads), thread_name_prefix="preprocess")
        tile_grid = self.tiling.tile_size // self.model.cfg.vision.patch_size
        self.tile_grid = (tile_grid, tile_grid)
        self.vit_tokens_per_tile = self.model.vit_tokens(self.tile_grid)
        if cfg.max_tokens_per_batch < self.vit_tokens_per_tile:
            raise ValueError(
                f"max_tokens_per_batch={cfg.max_tokens_per_batch} is below one tile "
                f"({self.vit_tokens_per_tile} ViT tokens)"
            )

    @property
    def tiling(self) -> TilingSpec:
        return self.processor.tiling

    def info(self) -> ModelInfo:
        return ModelInfo(
            model_name=self.model.cfg.name,
            hidden_size=self.model.cfg.output_size,
            dtype=self.dtype,
            patch_size=self.model.cfg.vision.patch_size,
            tiling=self.tiling,
            max_tokens_per_batch=self.cfg.max_tokens_per_batch,
            max_tokens_per_request=self.cfg.max_tokens_per_request,
            max_items_per_request=self.cfg.max_items_per_request,
            attention_backend=self.attention.name,
        )

    # ------------------------------------------------------------------ request path

    def check(self, items: list[MediaInput]) -> list[int]:
        """Cheap validation from headers/shapes only; returns each item's token count."""
        if not items:
            raise InvalidInput("request has no items")
        if len(items) > self.cfg.max_items_per_request:
            raise InvalidInput(f"{len(items)} items exceed the limit of {self.cfg.max_items_per_request} per request")
        counts = [self.processor.token_count(item)[0] for item in items]
        if sum(counts) > self.cfg.max_tokens_per_request:
            raise BudgetExceeded(
                f"request needs {sum(counts)} tokens, over the budget of {self.cfg.max_tokens_per_request} per request"
            )
        return counts

    def prepare(self, items: list[MediaInput]) -> list[ProcessedItem]:
        """Validate and preprocess (decode, tile) one request's items on the CPU; tiles stay uint8."""
        self.check(items)
        return list(self._preprocess_pool.map(self.processor.process, items))

    def encode(self, items: list[MediaInput], deadline: float | None = None) -> EncodeOutput:
        """Validate, preprocess and encode; `deadline` is a time.monotonic() instant."""
        t0 = time.perf_counter()
        processed = self.prepare(items)
        out = self.run(processed, deadline)
        out.stats["preprocess_ms"] = 1e3 * (time.perf_counter() - t0) - out.stats["forward_ms"]
        return out

    def run(
        self, processed: list[ProcessedItem], deadline: float | None = None, output_device: str = "cpu"
    ) -> EncodeOutput:
        """Encode already-prepared items (possibly from several requests) as one ragged stream."""
        t0 = time.perf_counter()
        embeddings, num_batches = self.encode_tiles([p.tiles for p in processed], deadline, output_device)
        counts = [p.num_tiles * self.model.tokens_out(self.tile_grid) for p in processed]
        if sum(counts) != embeddings.shape[0]:
            raise RuntimeError(f"model returned {embeddings.shape[0]} rows for {sum(counts)} expected tokens")
        return EncodeOutput(
            embeddings=embeddings,
            token_counts=counts,
            num_tiles=[p.num_tiles for p in processed],
            tokens_per_frame=[p.tokens_per_frame for p in processed],
            stats={"forward_ms": 1e3 * (time.perf_counter() - t0), "batches": num_batches},
        )

    def encode_tiles(
        self, tiles: list[torch.Tensor], deadline: float | None = None, output_device: str = "cpu"
    ) -> tuple[torch.Tensor, int]:
        """Per-item uint8 tiles [n_i, 3, S, S] -> ([sum(n_i) * tokens_per_tile, hidden], batches run).

        Batches are gathered lazily (never one giant input copy) and written into one
        preallocated output. On CUDA both staging buffers are pinned and come from
        PyTorch's caching host allocator: reused across requests, so copies run at
        DMA speed instead of faulting in fresh pageable memory every time.
        """
        views = [tile for item_tiles in tiles for tile in item_tiles]
        batches = plan_batches([self.vit_tokens_per_tile] * len(views), self.cfg.max_tokens_per_batch)
        rows_per_tile = self.model.tokens_out(self.tile_grid)
        pin = self.device.type == "cuda" and output_device == "cpu"
        out = torch.empty(
            len(views) * rows_per_tile, self.model.cfg.output_size, dtype=self.dtype, device=output_device, pin_memory=pin
        )
        for rows in batches:
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded("deadline passed while encoding")
            staged = torch.empty((len(rows), *views[0].shape), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            torch.stack(views[rows.start : rows.stop], out=staged)
            pixels = self.processor.normalize(staged.to(self.device, non_blocking=True), self.dtype)
            result = self.model(patchify(pixels, self.model.cfg.vision.patch_size), self.attention)
            out[rows.start * rows_per_tile : rows.stop * rows_per_tile].copy_(result, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return out, len(batches)
