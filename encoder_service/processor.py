"""Media -> normalised tiles, and the token arithmetic an LLM worker needs before encoding.

An item becomes one or more *pieces*, each one ViT sequence of its own pixel size:
- images, tiled (Nemotron Nano VL's fixed tiling): resized to the `cols x rows` grid of
  tiles whose aspect ratio is closest to its own (at most `max_tiles`), cut into tiles,
  plus a thumbnail of the whole image when there is more than one tile;
- images, dynamic resolution (when the checkpoint enables it): ONE piece, the image scaled
  to a patch budget with its aspect ratio kept (`dynamic_image_size`);
- video frames: one tile-sized piece each.
Token counts depend on the image size alone, so placeholders can be laid out in the
prompt before the encoder runs.

Pieces are uint8 HWC (as decoded), stored back to back in one flat buffer
(`ItemPlan.nbytes`): normalisation happens on the model's device. This module imports no torch on purpose: the out-of-process
preprocessing workers run it, and a worker that starts in a fraction of a second is
cheap to replace.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from encoder_service.config import DynamicResolution, ProcessorConfig, TilingSpec, VideoFrameGeometry
from encoder_service.errors import InvalidInput
from encoder_service.video import decode as video_decode
from encoder_service.video.decode import SampledFrames, VideoSampling
from encoder_service.video.evs import retained_token_count

if TYPE_CHECKING:  # annotations only: the workers run without torch
    import torch


class Modality(str, Enum):
    IMAGE = "image"
    VIDEO = "video"


@dataclass
class MediaInput:
    """One item of an Encode request, before decoding.

    data: encoded image bytes (image), a uint8 array [H, W, 3] (image) or
    [F, H, W, 3] (video), a list of encoded frames (video) or a video container's bytes (video).
    sampling: which frames of a video container to encode. pruning_rate: EVS rate q for a
    video (None: the deployment's default).
    """

    modality: Modality
    data: bytes | np.ndarray | list[bytes]
    item_id: str = ""
    content_hash: str = ""
    sampling: VideoSampling | None = None
    pruning_rate: float | None = None


Size = tuple[int, int]  # (height, width) in pixels


@dataclass(frozen=True)
class ItemPlan:
    """What an item will produce, known from its header or shape before any decoding."""

    sizes: tuple[Size, ...]  # pixel size of each piece (tile, frame or dynamic-resolution image)
    tokens: int  # embedding rows (of a pruned video: after pruning)
    tokens_per_frame: tuple[int, ...] = ()  # video only; of a pruned video: before pruning
    pruning_rate: float = 0.0  # EVS rate q of a video (0: every token kept)
    frames: SampledFrames | None = None  # a video container's sampled frames (indices, rate), before decoding
    decode_pixels: int = 0  # pixels decoding will produce (all frames), from the headers: its CPU/memory cost
    image_size: Size | None = None  # an image's (height, width) from its header

    @property
    def pruned(self) -> bool:
        return self.pruning_rate > 0 and len(self.tokens_per_frame) > 1

    @property
    def num_tiles(self) -> int:
        return len(self.sizes)

    @property
    def nbytes(self) -> int:
        return sum(h * w * 3 for h, w in self.sizes)

    @property
    def decoded_nbytes(self) -> int:
        """Bytes of an image decoded to RGB at its own size (what a worker writes for `preprocess_device`)."""
        return self.decode_pixels * 3


@dataclass
class ProcessedItem:
    pixels: np.ndarray | torch.Tensor  # uint8, flat: each piece [h, w, 3] in turn (a tensor: on the device)
    sizes: tuple[Size, ...]
    tokens_per_frame: list[int] = field(default_factory=list)  # video only
    plan: ItemPlan | None = None
    frames: SampledFrames | None = None  # a video container's sampled frames, with their decoded times

    @property
    def num_tiles(self) -> int:
        return len(self.sizes)

    def pieces(self) -> list[np.ndarray]:
        """Views of each piece as [h, w, 3]."""
        return split_pieces(self.pixels, self.sizes)


def byte_range(sizes: tuple[Size, ...] | list[Size], start: int, stop: int) -> tuple[int, int]:
    """Where pieces [start, stop) lie in an item's flat pixel buffer."""
    begin = sum(h * w * 3 for h, w in sizes[:start])
    return begin, begin + sum(h * w * 3 for h, w in sizes[start:stop])


def split_pieces(flat: np.ndarray, sizes: tuple[Size, ...] | list[Size]) -> list[np.ndarray]:
    out, pos = [], 0
    for h, w in sizes:
        out.append(flat[pos : pos + h * w * 3].reshape(h, w, 3))
        pos += h * w * 3
    return out


# ---------------------------------------------------------------- token arithmetic (pure)


@lru_cache(maxsize=64)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """(cols, rows) with min_tiles <= cols*rows <= max_tiles, fewest tiles first."""
    grids = {
        (c, r)
        for n in range(min_tiles, max_tiles + 1)
        for c in range(1, n + 1)
        for r in range(1, n + 1)
        if min_tiles <= c * r <= max_tiles
    }
    return tuple(sorted(grids, key=lambda g: (g[0] * g[1], g)))


def choose_grid(width: int, height: int, spec: TilingSpec) -> tuple[int, int]:
    """The tile grid (cols, rows) whose aspect ratio is closest to the image's.

    Ties go to the larger grid only if the image has enough pixels to fill more
    than half of it, so small images are not blown up into many tiles.
    """
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _candidate_grids(spec.min_tiles, spec.max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * spec.tile_size**2 * cols * rows:
            best = (cols, rows)
    return best


def count_image_tiles(width: int, height: int, spec: TilingSpec) -> int:
    cols, rows = choose_grid(width, height, spec)
    n = cols * rows
    return n + 1 if spec.use_thumbnail and n > 1 else n


def count_image_tokens(width: int, height: int, spec: TilingSpec) -> int:
    """Embedding rows the encoder returns for a width x height image."""
    return count_image_tiles(width, height, spec) * spec.tokens_per_tile


def video_frame_size(width: int, height: int, spec: TilingSpec, geometry: VideoFrameGeometry | None) -> Size:
    """(height, width) in pixels every frame of a width x height video is resized to: one square tile,
    or the patch budget of `geometry` (vLLM's `get_video_target_size_and_feature_size`)."""
    if geometry is None:
        return spec.tile_size, spec.tile_size
    n, step, p = geometry.target_num_patches, geometry.downsample, geometry.patch_size
    if not geometry.maintain_aspect_ratio:
        side = max(step, math.isqrt(n) // step * step)
        return side * p, side * p
    aspect = width / max(height, 1)
    rows, cols = max(1, round(math.sqrt(n / aspect))), max(1, round(math.sqrt(n * aspect)))
    if step > 1:
        up_rows, up_cols = -(-rows // step) * step, -(-cols // step) * step
        if up_rows * up_cols <= n:
            rows, cols = up_rows, up_cols
        else:
            rows, cols = max(step, rows // step * step), max(step, cols // step * step)
    return rows * p, cols * p


def count_frame_tokens(size: Size, patch_size: int, downsample: int) -> int:
    """Embedding rows of one video frame of `size` pixels."""
    h, w = size
    return (h // patch_size // downsample) * (w // patch_size // downsample)


def _round_to_multiple(n: int, other: int, budget: int, step: int) -> int:
    """Round n to a multiple of `step`: up while n*other stays within budget, else down (at least `step`)."""
    rem = n % step
    if not rem:
        return n
    if (n + step - rem) * other <= budget:
        return n + step - rem
    return max(step, n - rem)


def dynamic_patch_grid(width: int, height: int, spec: DynamicResolution) -> tuple[int, int]:
    """(rows, cols) of patches a width x height image is scaled to, as Nemotron Nano VL does it.

    The published algorithm (vLLM `DynamicResolutionImageTiler.process_media`, for one image
    whose budget is `max_num_patches`): the closest patch grid, scaled down (never up) by
    sqrt(budget / patches), floored; raised to `min_num_patches` if below it; then each side
    rounded to an even count, up while the budget allows, else down. Python's round() (half
    to even) is part of the definition. One deviation: a side that floors to 0 patches (an
    image thinner than 1/budget of its length, where the published code divides by zero)
    is kept at 1 patch before rounding.
    """
    p, budget, step = spec.patch_size, spec.max_num_patches, spec.downsample
    rows, cols = round(height / p + 0.5), round(width / p + 0.5)
    factor = min(math.sqrt(budget / (rows * cols)), 1.0)
    rows, cols = max(1, math.floor(factor * rows)), max(1, math.floor(factor * cols))
    if budget > spec.min_num_patches and rows * cols < spec.min_num_patches:
        up = math.sqrt(spec.min_num_patches / (rows * cols))
        rows, cols = math.ceil(up * rows), math.ceil(up * cols)
    if step > 1:
        rows = _round_to_multiple(rows, cols, budget, step)
        cols = _round_to_multiple(cols, rows, budget, step)
    return rows, cols


def dynamic_image_size(width: int, height: int, spec: DynamicResolution) -> Size:
    """(height, width) in pixels of the one sequence a dynamic-resolution image becomes."""
    rows, cols = dynamic_patch_grid(width, height, spec)
    return rows * spec.patch_size, cols * spec.patch_size


def count_dynamic_tokens(width: int, height: int, spec: DynamicResolution) -> int:
    rows, cols = dynamic_patch_grid(width, height, spec)
    return (rows // spec.downsample) * (cols // spec.downsample)


# ---------------------------------------------------------------- decoding and tiling


IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # what an IMAGE item may be; GIF and the rest are refused
# PIL modes JPEG/PNG/WebP decode to. 8-bit ones convert to RGB as they are (alpha dropped, palettes
# expanded; 16-bit-per-channel RGB PNGs already arrive as 8-bit "RGB"); 16-bit grey is rescaled.
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I"})


class ImageProcessor:
    def __init__(self, cfg: ProcessorConfig):
        self.cfg = cfg

    @property
    def tiling(self) -> TilingSpec:
        return self.cfg.tiling

    @property
    def tile_shape(self) -> tuple[int, int, int]:
        return (self.tiling.tile_size, self.tiling.tile_size, 3)

    def plan(self, item: MediaInput) -> ItemPlan:
        """Pieces and tokens an item will produce, from its header/shape only (no decoding)."""
        if item.modality == Modality.IMAGE:
            w, h = self.image_size(item.data)
            return dataclasses.replace(self.plan_image(w, h), decode_pixels=w * h, image_size=(h, w))
        if item.modality == Modality.VIDEO:
            sampled = None
            if isinstance(item.data, (bytes, bytearray)):
                probe = video_decode.probe(item.data, item.sampling or VideoSampling(),
                                           self.cfg.default_video_frames, self.cfg.max_video_frames)
                self._check_size(probe.width, probe.height)
                sampled, num_frames = SampledFrames(probe.indices, probe.fps), len(probe.indices)
                (width, height), decode_pixels = (probe.width, probe.height), probe.width * probe.height * num_frames
            else:
                num_frames = self._num_frames(item.data)
                sizes = list(map(self._frame_size, item.data))
                (width, height), decode_pixels = sizes[0], sum(w * h for w, h in sizes)
            size = video_frame_size(width, height, self.tiling, self.cfg.video_frames)
            geometry = self.cfg.video_frames
            per_frame = (self.tiling.tokens_per_tile if geometry is None
                         else count_frame_tokens(size, geometry.patch_size, geometry.downsample))
            q = self.cfg.video_pruning_rate if item.pruning_rate is None else item.pruning_rate
            try:
                tokens = retained_token_count(per_frame, num_frames, q)
            except ValueError as e:
                raise InvalidInput(str(e)) from None
            return ItemPlan((size,) * num_frames, tokens, (per_frame,) * num_frames, q, sampled, decode_pixels)
        raise InvalidInput(f"unknown modality {item.modality!r}")

    def plan_image(self, width: int, height: int) -> ItemPlan:
        if self.cfg.dynamic is not None:
            return ItemPlan((dynamic_image_size(width, height, self.cfg.dynamic),),
                            count_dynamic_tokens(width, height, self.cfg.dynamic))
        n = count_image_tiles(width, height, self.tiling)
        return ItemPlan(((self.tiling.tile_size,) * 2,) * n, count_image_tokens(width, height, self.tiling))

    def process(self, item: MediaInput) -> ProcessedItem:
        """Decode and tile into a new array (the in-process path)."""
        plan = self.plan(item)
        pixels = np.empty(plan.nbytes, dtype=np.uint8)
        times = self.process_into(item, pixels, plan)
        frames = dataclasses.replace(plan.frames, times=tuple(times)) if plan.frames else None
        return ProcessedItem(pixels, plan.sizes, list(plan.tokens_per_frame), plan, frames)

    def process_into(self, item: MediaInput, out: np.ndarray, plan: ItemPlan | None = None) -> list[float]:
        """Decode `item` into `out` (flat uint8 of the plan's `nbytes`, e.g. shared memory), piece by piece.
        Returns the sampled frames' times (s) of a video container, else []."""
        plan = plan or self.plan(item)
        if out.size != plan.nbytes:
            raise RuntimeError(f"planned {plan.nbytes} bytes of pixels but got a buffer of {out.size}")
        if item.modality == Modality.IMAGE and self.cfg.dynamic is not None:
            (h, w), = plan.sizes
            image = self.load_image(item.data)
            np.copyto(out.reshape(h, w, 3), self.resize(image, w, h))
            return []
        times: list[float] = []
        if item.modality == Modality.IMAGE:
            written = self.tile_image_into(self.load_image(item.data), out.reshape(plan.num_tiles, *self.tile_shape))
        elif item.modality == Modality.VIDEO and isinstance(item.data, (bytes, bytearray)):
            times = self.container_into(item.data, plan.frames.indices, out.reshape(plan.num_tiles, *plan.sizes[0], 3))
            written = len(times)
        elif item.modality == Modality.VIDEO:
            written = self.frames_into(item.data, out.reshape(plan.num_tiles, *plan.sizes[0], 3))
        else:
            raise InvalidInput(f"unknown modality {item.modality!r}")
        if written != plan.num_tiles:
            raise RuntimeError(f"planned {plan.num_tiles} tiles but produced {written}")
        return times

    def decode_into(self, item: MediaInput, out: np.ndarray) -> None:
        """An image decoded to RGB into `out` (flat uint8 of height x width x 3, e.g. shared memory): the
        device path's share of the work (`preprocess_device`: it resizes and tiles on the GPU)."""
        image = np.asarray(self.load_image(item.data))
        if out.size != image.size:
            raise InvalidInput(f"the image decoded to {image.shape[1]}x{image.shape[0]}, not the size its header gave")
        np.copyto(out.reshape(image.shape), image)

    def resize(self, image: Image.Image, width: int, height: int) -> np.ndarray:
        """The image at width x height, uint8 HWC, with the checkpoint's resampling (`ProcessorConfig.resize`):
        PIL's bicubic, or torchvision's antialiased bicubic on uint8 (what Hugging Face's torchvision image
        processors, and so vLLM, do: the same call on the same channels-last layout, so the same pixels)."""
        if self.cfg.resize == "pil":
            return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))
        pixels = np.asarray(image)
        if pixels.shape[:2] == (height, width):
            return pixels
        import torch  # only the processes of checkpoints that resample this way load it
        import torch.nn.functional as F

        torch.set_num_threads(1)
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None]
        out = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        return out[0].permute(1, 2, 0).numpy()

    def tile_image_into(self, image: Image.Image, out: np.ndarray) -> int:
        """Resize to the chosen grid, cut into tiles (row-major), add the thumbnail; returns tiles written."""
        t = self.tiling.tile_size
        cols, rows = choose_grid(image.width, image.height, self.tiling)
        resized = self.resize(image, cols * t, rows * t)
        n = cols * rows
        # Tile (r, c) is resized[r*t:(r+1)*t, c*t:(c+1)*t]: one strided copy cuts them all.
        np.copyto(out[:n].reshape(rows, cols, t, t, 3), resized.reshape(rows, t, cols, t, 3).swapaxes(1, 2))
        if self.tiling.use_thumbnail and n > 1:
            out[n] = self.resize(image, t, t)
            n += 1
        return n

    def container_into(self, data: bytes, indices: tuple[int, ...], out: np.ndarray) -> list[float]:
        """Decode the sampled frames of a video container into `out` [F, h, w, 3], each resized as it
        is decoded; returns the frames' presentation times (s)."""
        h, w = out.shape[1:3]
        actual = [0.0] * len(indices)

        def consume(i: int, rgb: np.ndarray, seconds: float) -> None:
            out[i] = self.resize(Image.fromarray(rgb, "RGB"), w, h)
            actual[i] = seconds

        video_decode.decode_sampled(data, indices, consume)
        return actual

    def frames_into(self, data: np.ndarray | list[bytes], out: np.ndarray) -> int:
        """Frames into `out` [F, h, w, 3], each decoded and resized before the next is decoded (one
        full-size frame in memory at a time); returns frames written."""
        h, w = out.shape[1:3]
        count = self._num_frames(data)
        for i, frame in enumerate(data):
            image = Image.fromarray(frame, "RGB") if isinstance(frame, np.ndarray) else self.load_image(frame)
            out[i] = self.resize(image, w, h)
        return count

    # -- validation + decoding: every failure is the caller's, so InvalidInput

    def image_size(self, data: bytes | np.ndarray) -> tuple[int, int]:
        if isinstance(data, np.ndarray):
            self._check_pixels(data, ndim=3)
            return data.shape[1], data.shape[0]
        with self._open(data) as img:
            self._check_size(img.width, img.height)
            return img.width, img.height

    def load_image(self, data: bytes | np.ndarray) -> Image.Image:
        if isinstance(data, np.ndarray):
            self._check_pixels(data, ndim=3)
            return Image.fromarray(data, "RGB")
        with self._open(data) as img:
            self._check_size(img.width, img.height)
            try:
                if img.mode in HIGH_BIT_DEPTH_MODES:  # 16-bit grey PNG: scale to 8 bits (convert() would clip)
                    grey = np.asarray(img).astype(np.uint32)
                    return Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
                if img.mode == "RGB":  # decoded as it is: convert() would only copy it
                    img.load()
                    return img
                return img.convert("RGB")
            except (OSError, ValueError) as e:
                raise InvalidInput(f"corrupt image data: {e}") from e

    def _frame_size(self, frame: bytes | np.ndarray) -> tuple[int, int]:
        """(width, height) of one frame from its header (checked like an image's)."""
        if isinstance(frame, np.ndarray):
            return frame.shape[1], frame.shape[0]
        return self.image_size(frame)

    def _num_frames(self, data) -> int:
        if isinstance(data, np.ndarray):
            self._check_pixels(data, ndim=4)
            n = data.shape[0]
        elif isinstance(data, list):
            n = len(data)
        else:
            raise InvalidInput("a video is a uint8 array [F, H, W, 3] or a list of encoded frames")
        if n == 0:
            raise InvalidInput("video has no frames")
        if n > self.cfg.max_video_frames:
            raise InvalidInput(f"video has {n} frames, more than the limit {self.cfg.max_video_frames}")
        return n

    def _open(self, data: bytes) -> Image.Image:
        if not isinstance(data, (bytes, bytearray)) or len(data) == 0:
            raise InvalidInput("empty image data")
        try:  # only these decoders see untrusted bytes (others, e.g. SGI's, fail on junk with ValueError)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as e:
            raise InvalidInput(f"image too large: {e}") from e
        except UnidentifiedImageError as e:
            raise InvalidInput(f"undecodable image data ({len(data)} bytes): not a JPEG, PNG or WebP file") from e
        except (OSError, ValueError) as e:
            raise InvalidInput(f"undecodable image data ({len(data)} bytes): {e}") from e
        if getattr(img, "n_frames", 1) > 1:  # APNG / animated WebP: refused like GIF
            frames = img.n_frames
            img.close()
            raise InvalidInput(f"animated {img.format} ({frames} frames) is not supported as an image; "
                               f"send its frames as a VIDEO item (encoded_frames)")
        if img.mode not in EIGHT_BIT_MODES and img.mode not in HIGH_BIT_DEPTH_MODES:
            mode = img.mode
            img.close()
            raise InvalidInput(f"unsupported pixel format {mode!r}; send 8-bit RGB/grey or 16-bit grey")
        return img

    def _check_pixels(self, data: np.ndarray, ndim: int) -> None:
        if data.dtype != np.uint8 or data.ndim != ndim or data.shape[-1] != 3:
            want = "[H, W, 3]" if ndim == 3 else "[F, H, W, 3]"
            raise InvalidInput(f"raw pixels must be uint8 {want}, got {data.dtype} {list(data.shape)}")
        self._check_size(data.shape[-2], data.shape[-3])

    def _check_size(self, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise InvalidInput(f"zero-size image ({width}x{height})")
        if width * height > self.cfg.max_image_pixels:
            raise InvalidInput(f"image {width}x{height} exceeds {self.cfg.max_image_pixels} pixels")
