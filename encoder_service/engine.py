"""The encoder engine: media items in, ONE embedding tensor [sum(n_i), hidden] + counts out.

request items -> plan (`contract.plan`: pieces and rows from headers) -> preprocess (decode, tile)
-> batching (token budget) -> model (ragged ViT + projector, once per batch) -> one concatenated
tensor. The consumer splits by counts.

`launch` is the one place pixels meet the model: it packs groups of pieces (tiles, frames,
dynamic-resolution images: `contract.plan.ItemPlan`) into one ragged forward and writes each
group's rows where the caller wants them, without waiting for the device. `run`/`encode` use
it in-process (tests, benchmarks, the reference); the serving pipeline
(`encoder_service.serving.host.pipeline`) uses it to keep batches in flight. A video to prune (EVS)
is encoded whole first; `prune_into` then keeps its rows that change most between frames.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from encoder_service.attention import AttentionSpec, get_backend
from encoder_service.batching import PieceSource, TileQueue, batch_inputs
from encoder_service.config import EngineConfig
from encoder_service.contract.errors import BudgetExceeded, DeadlineExceeded, InvalidInput, ItemError
from encoder_service.contract.media import MediaInput
from encoder_service.contract.model_info import ModelInfo
from encoder_service.contract.plan import ItemPlan
from encoder_service.contract.result import EncodeResult, describe_item, dtype_from_name, running_offsets
from encoder_service.contract.tokens import Size, TilingSpec, check_rate
from encoder_service.fingerprint import of_checkpoint
from encoder_service.models import load_checkpoint, tiny_checkpoint_dir
from encoder_service.models.vit import KernelOptions, PackedTiles, patchify_hwc
from encoder_service.preprocess import device as device_preprocess
from encoder_service.preprocess.cpu import CpuPreprocessor, ProcessedItem
from encoder_service.video.evs import prune


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda if available, else cpu; a CUDA device always gets its index (threads set it)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unsupported dtype {dtype!r}; choose auto, float32, bfloat16, float16")
    return dtype_from_name(dtype)


class EncoderEngine:
    def __init__(self, cfg: EngineConfig | None = None):
        self.cfg = cfg = cfg or EngineConfig()
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.model = load_checkpoint(cfg.checkpoint or tiny_checkpoint_dir(), self.device, self.dtype)
        proc = self.model.cfg.processor
        if cfg.video_pruning_rate is not None:
            check_rate(cfg.video_pruning_rate)
            proc = dataclasses.replace(proc, video_pruning_rate=cfg.video_pruning_rate)
        self.preprocessor = CpuPreprocessor(proc)
        self.planner = self.preprocessor.planner
        tiling_device = device_preprocess.resolve(cfg.preprocess_device, self.device, proc)
        # Resizes and tiles images on the GPU (None: the CPU path does it all).
        self.device_tiler = None if tiling_device is None else device_preprocess.DeviceTiler(proc, tiling_device)
        vision = self.model.cfg.vision
        self.patch_size = p = vision.patch_size
        # Per patch-row column (channel-major inside a patch, as patchify_hwc lays them out).
        self._mean = torch.tensor(proc.image_mean, device=self.device).repeat_interleave(p * p)
        self._std = torch.tensor(proc.image_std, device=self.device).repeat_interleave(p * p)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._preprocess_pool = ThreadPoolExecutor(max(1, cfg.preprocess_threads), thread_name_prefix="preprocess")
        shortest = largest = self.piece_tokens((self.tiling.tile_size,) * 2)
        if proc.dynamic is not None:
            largest = max(largest, proc.dynamic.max_num_patches + vision.num_prefix_tokens)
            shortest = min(shortest, proc.dynamic.min_num_patches + vision.num_prefix_tokens)
        if proc.video_frames is not None:  # frames near the patch budget (extreme aspects: per request)
            largest = max(largest, proc.video_frames.target_num_patches + vision.num_prefix_tokens)
        if cfg.max_tokens_per_batch < largest:
            raise ValueError(
                f"max_tokens_per_batch={cfg.max_tokens_per_batch} is below the longest sequence this model "
                f"can get ({largest} ViT tokens); raise it to at least {largest}"
            )
        # Unusable backends and kernel options fail here, at start-up, never mid-request.
        self.attention = get_backend(
            cfg.attention_backend, AttentionSpec(self.device, vision.num_heads, vision.head_dim, self.dtype)
        )
        if hasattr(self.attention, "warmup"):  # build the kernels' per-shape graphs now, not on a request
            self.attention.warmup(cfg.max_tokens_per_batch, shortest, largest)
        fast = self.device.type == "cuda" and self.dtype != torch.float32
        kernels = KernelOptions(gelu_epilogue=fast if cfg.gelu_epilogue is None else cfg.gelu_epilogue,
                                compile_norms=cfg.compile_norms)
        self.model.vit.use_kernels(kernels)
        self.fingerprint = of_checkpoint(cfg.checkpoint or tiny_checkpoint_dir(), str(self.dtype).removeprefix("torch."),
                                         numerics=f"gelu_epilogue={kernels.gelu_epilogue}")

    def piece_tokens(self, size: Size) -> int:
        """ViT tokens of one piece of `size` (h, w) pixels: its patches plus the prefix tokens."""
        return self.model.vit_tokens((size[0] // self.patch_size, size[1] // self.patch_size))

    def piece_rows(self, size: Size) -> int:
        """Embedding rows one piece of `size` (h, w) pixels produces."""
        return self.model.tokens_out((size[0] // self.patch_size, size[1] // self.patch_size))

    @property
    def tiling(self) -> TilingSpec:
        return self.planner.tiling

    @property
    def hidden_size(self) -> int:
        return self.model.cfg.output_size

    def info(self) -> ModelInfo:
        return ModelInfo(
            model_name=self.model.cfg.name,
            hidden_size=self.hidden_size,
            dtype=self.dtype,
            patch_size=self.model.cfg.vision.patch_size,
            tiling=self.tiling,
            dynamic=self.planner.rules.dynamic,
            max_tokens_per_batch=self.cfg.max_tokens_per_batch,
            max_tokens_per_request=self.cfg.max_tokens_per_request,
            max_items_per_request=self.cfg.max_items_per_request,
            attention_backend=self.attention.name,
            video_pruning_rate=self.planner.rules.video_pruning_rate,
            default_video_frames=self.planner.rules.default_video_frames,
            fingerprint=self.fingerprint,
            video_frames=self.planner.rules.video_frames,
        )

    # ------------------------------------------------------------------ request checks

    def plan(self, items: list[MediaInput]) -> list[ItemPlan]:
        """Cheap validation from headers/shapes only: what each item will produce."""
        self.check_item_count(len(items))
        plans = [self.plan_item(i, item) for i, item in enumerate(items)]
        self.check_budgets(sum(p.decode_pixels for p in plans), sum(p.tokens for p in plans))
        return plans

    def check_item_count(self, count: int) -> None:
        if not count:
            raise InvalidInput("request has no items")
        if count > self.cfg.max_items_per_request:
            raise InvalidInput(f"{count} items exceed the limit of {self.cfg.max_items_per_request} per request")

    def plan_item(self, index: int, item: MediaInput) -> ItemPlan:
        """One item's plan from its header or shape; an error names the item."""
        try:
            plan = self.planner.plan(item)
            longest = max(self.piece_tokens(size) for size in plan.sizes)
            if longest > self.cfg.max_tokens_per_batch:  # only with a raised max_num_patches or a small budget
                raise BudgetExceeded(f"needs a sequence of {longest} ViT tokens, over the batch budget "
                                     f"of {self.cfg.max_tokens_per_batch}")
            return plan
        except ItemError as e:
            raise e.for_item(index, item.item_id) from None

    def check_budgets(self, decode_pixels: int, tokens: int) -> None:
        """A request's decode pixels (of the items it makes the server decode) and output tokens."""
        if decode_pixels > self.cfg.max_decode_pixels_per_request:
            raise BudgetExceeded(f"request would decode {decode_pixels / 1e6:.0f} MP of images/frames, over the budget "
                                 f"of {self.cfg.max_decode_pixels_per_request / 1e6:.0f} MP per request")
        if tokens > self.cfg.max_tokens_per_request:
            raise BudgetExceeded(
                f"request needs {tokens} tokens, over the budget of {self.cfg.max_tokens_per_request} per request"
            )

    def new_output(self, rows: int) -> torch.Tensor:
        """Host memory for `rows` embedding rows; pinned on CUDA so device-to-host copies run at DMA speed
        (PyTorch's caching host allocator reuses these blocks across requests)."""
        pin = self.device.type == "cuda"
        return torch.empty(rows, self.hidden_size, dtype=self.dtype, pin_memory=pin)

    # ------------------------------------------------------------------ model work

    def forward(self, pixels: torch.Tensor, sizes: list[Size]) -> torch.Tensor:
        """Flat uint8 pixels on the device (pieces [h, w, 3] back to back) -> embeddings [rows, hidden]."""
        batch = patchify_hwc(pixels, sizes, self.patch_size)
        x = ((batch.patches.float() / 255.0 - self._mean) / self._std).to(self.dtype)
        return self.model(PackedTiles(x, batch.grids), self.attention)

    def launch(
        self, pixels: list[torch.Tensor], sizes: list[list[Size]], outputs: list[torch.Tensor]
    ) -> torch.cuda.Event | None:
        """Encode groups of pieces as ONE ragged forward; write group i's rows into `outputs[i]`.

        pixels[i]: flat uint8, the pieces of `sizes[i]` back to back, on the host or the device;
        outputs[i]: [sum(piece_rows), hidden]. On CUDA nothing waits for the device: host pixels
        must stay untouched, and outputs unread, until the returned event has completed (or the
        caller synchronises). Host pixels that are not page-locked are staged through pinned
        memory first. The rows go out on a copy stream of their own, so a batch's
        device-to-host copy overlaps the next batch's forward.
        """
        if self.device.type == "cuda":
            flat = torch.empty(sum(t.numel() for t in pixels), dtype=torch.uint8, device=self.device)
            pos = 0
            for t in pixels:
                src = t if t.is_cuda or t.is_pinned() else t.pin_memory()
                flat[pos : pos + t.numel()].copy_(src.reshape(-1), non_blocking=True)
                pos += t.numel()
        else:
            flat = pixels[0].reshape(-1) if len(pixels) == 1 else torch.cat([t.reshape(-1) for t in pixels])
        embeddings = self.forward(flat, [size for group in sizes for size in group])
        if self._copy_stream is None:
            self._write_rows(embeddings, sizes, outputs)
            return None
        forward_done = torch.cuda.Event()
        forward_done.record()
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(forward_done)
            self._write_rows(embeddings, sizes, outputs)
            rows_out = torch.cuda.Event(blocking=True)
            rows_out.record()
        embeddings.record_stream(self._copy_stream)  # not reused by the next forward until copied
        return rows_out

    def _write_rows(self, embeddings: torch.Tensor, sizes: list[list[Size]], outputs: list[torch.Tensor]) -> None:
        row = 0
        for group, out in zip(sizes, outputs):
            n = sum(self.piece_rows(size) for size in group)
            out.copy_(embeddings[row : row + n], non_blocking=True)
            row += n

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
            self._copy_stream.synchronize()

    # ------------------------------------------------------------------ in-process path

    def prepare(self, items: list[MediaInput]) -> list[ProcessedItem]:
        """Validate and preprocess (decode, tile) one request's items on this process's threads."""
        self.plan(items)
        return list(self._preprocess_pool.map(self._prepare_one, items))

    def _prepare_one(self, item: MediaInput) -> ProcessedItem:
        if self.device_tiler is None or not device_preprocess.on_device(item):
            return self.preprocessor.process(item)
        plan = self.planner.plan(item)
        image = device_preprocess.host_decoded(self.preprocessor, item, plan, self.device)
        return ProcessedItem(self.device_tiler.pieces(image, plan), plan.sizes, [], plan)

    def encode(self, items: list[MediaInput], deadline: float | None = None) -> EncodeResult:
        """Validate, preprocess and encode in this process; `deadline` is a time.monotonic() instant."""
        t0 = time.perf_counter()
        processed = self.prepare(items)
        out = self.run(processed, deadline)
        out.extras["preprocess_ms"] = 1e3 * (time.perf_counter() - t0) - out.extras["forward_ms"]
        return out

    def run(
        self, processed: list[ProcessedItem], deadline: float | None = None, output_device: str = "cpu"
    ) -> EncodeResult:
        """Encode already-prepared items as one ragged stream of batches into one output tensor."""
        t0 = time.perf_counter()
        rows = [[self.piece_rows(size) for size in p.sizes] for p in processed]
        counts = [p.plan.tokens if p.plan else sum(r) for p, r in zip(processed, rows)]
        if output_device == "cpu":
            out = self.new_output(sum(counts))
        else:
            out = torch.empty(sum(counts), self.hidden_size, dtype=self.dtype, device=output_device)
        first_row = running_offsets(counts)
        # A video to prune is encoded whole into its own rows first; EVS then picks what `out` keeps.
        targets = [
            torch.empty(sum(r), self.hidden_size, dtype=self.dtype, device=out.device) if p.plan and p.plan.pruned
            else out[first_row[i] : first_row[i] + counts[i]]
            for i, (p, r) in enumerate(zip(processed, rows))
        ]
        sources = [PieceSource(p.pixels if isinstance(p.pixels, torch.Tensor) else torch.from_numpy(p.pixels),
                               p.sizes, r, target) for p, r, target in zip(processed, rows, targets)]
        queue: TileQueue[int] = TileQueue(self.cfg.max_tokens_per_batch)
        for i, p in enumerate(processed):
            queue.push(i, [self.piece_tokens(size) for size in p.sizes])
        batches = 0
        while spans := queue.take():
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded("deadline passed while encoding")
            self.launch(*batch_inputs(spans, sources.__getitem__))
            batches += 1
        self.synchronize()
        items = []
        for i, p in enumerate(processed):
            frames = list(p.tokens_per_frame)
            if p.plan and p.plan.pruned:
                frames = self.prune_into(targets[i], p.plan, out[first_row[i] : first_row[i] + counts[i]])
            items.append(describe_item(first_row[i], counts[i], p.num_tiles, frames, p.frames))
        return EncodeResult("", out, items, {"forward_ms": 1e3 * (time.perf_counter() - t0), "batches": batches})

    @staticmethod
    def prune_into(rows: torch.Tensor, plan: ItemPlan, out: torch.Tensor) -> list[int]:
        """EVS on a whole video's rows; the kept rows go to `out` (sized by the plan). Returns tokens per frame."""
        kept, per_frame = prune(rows, plan.num_tiles, plan.pruning_rate)
        if kept.shape[0] != out.shape[0]:
            raise RuntimeError(f"EVS kept {kept.shape[0]} rows, the plan said {out.shape[0]}")
        out.copy_(kept)
        return per_frame
