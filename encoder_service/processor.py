"""Media -> normalised tiles, and the token arithmetic an LLM worker needs before encoding.

Images use Nemotron Nano VL's dynamic tiling: the image is resized to the
`cols x rows` grid of tiles whose aspect ratio is closest to its own (at most
`max_tiles` tiles), cut into tiles, and a thumbnail of the whole image is
appended when there is more than one tile. A video frame is one tile.
`count_image_tokens` depends on the image size alone, so placeholders can be
laid out in the prompt before the encoder runs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from encoder_service.config import ProcessorConfig, TilingSpec
from encoder_service.errors import InvalidInput


class Modality(str, Enum):
    IMAGE = "image"
    VIDEO = "video"


@dataclass
class MediaInput:
    """One item of an Encode request, before decoding.

    data: encoded image bytes (image), a uint8 array [H, W, 3] (image) or
    [F, H, W, 3] (video), or a list of encoded frames (video).
    """

    modality: Modality
    data: bytes | np.ndarray | list[bytes]
    item_id: str = ""
    content_hash: str = ""


@dataclass
class ProcessedItem:
    tiles: torch.Tensor  # [num_tiles, 3, tile, tile] uint8; normalised on the model's device
    tokens_per_frame: list[int] = field(default_factory=list)  # video only

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]


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


def count_video_tokens(num_frames: int, spec: TilingSpec) -> list[int]:
    """Embedding rows per frame of a video (one tile per frame)."""
    return [spec.tokens_per_tile] * num_frames


# ---------------------------------------------------------------- decoding and tiling


def _stack(tiles: list[Image.Image]) -> torch.Tensor:
    """PIL tiles -> uint8 [n, 3, H, W]."""
    return torch.from_numpy(np.stack([np.asarray(t, dtype=np.uint8) for t in tiles])).permute(0, 3, 1, 2)


class ImageProcessor:
    def __init__(self, cfg: ProcessorConfig):
        self.cfg = cfg
        self.mean = torch.tensor(cfg.image_mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.image_std).view(3, 1, 1)

    @property
    def tiling(self) -> TilingSpec:
        return self.cfg.tiling

    def process(self, item: MediaInput) -> ProcessedItem:
        if item.modality == Modality.IMAGE:
            image = self.load_image(item.data)
            return ProcessedItem(_stack(self.tile_image(image)))
        if item.modality == Modality.VIDEO:
            frames = self.load_frames(item.data)
            size = (self.tiling.tile_size, self.tiling.tile_size)
            tiles = [f.resize(size, Image.Resampling.BICUBIC) for f in frames]
            return ProcessedItem(_stack(tiles), count_video_tokens(len(frames), self.tiling))
        raise InvalidInput(f"unknown modality {item.modality!r}")

    def token_count(self, item: MediaInput) -> tuple[int, list[int]]:
        """Tokens an item will produce, from its header/shape only (no tiling work)."""
        if item.modality == Modality.IMAGE:
            w, h = self.image_size(item.data)
            return count_image_tokens(w, h, self.tiling), []
        frames = count_video_tokens(self._num_frames(item.data), self.tiling)
        return sum(frames), frames

    def tile_image(self, image: Image.Image) -> list[Image.Image]:
        t = self.tiling.tile_size
        cols, rows = choose_grid(image.width, image.height, self.tiling)
        resized = image.resize((cols * t, rows * t), Image.Resampling.BICUBIC)
        tiles = [resized.crop((c * t, r * t, (c + 1) * t, (r + 1) * t)) for r in range(rows) for c in range(cols)]
        if self.tiling.use_thumbnail and len(tiles) > 1:
            tiles.append(image.resize((t, t), Image.Resampling.BICUBIC))
        return tiles

    def normalize(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 [n, 3, H, W] -> normalised `dtype`, on whatever device the pixels are.

        Tiles stay uint8 until they reach the GPU: 4x less host memory and H2D traffic.
        """
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        return ((pixels.float() / 255.0 - mean) / std).to(dtype)

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
                return img.convert("RGB")
            except (OSError, ValueError) as e:
                raise InvalidInput(f"corrupt image data: {e}") from e

    def load_frames(self, data: np.ndarray | list[bytes]) -> list[Image.Image]:
        self._num_frames(data)
        if isinstance(data, np.ndarray):
            return [Image.fromarray(frame, "RGB") for frame in data]
        return [self.load_image(frame) for frame in data]

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
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise InvalidInput(f"image too large: {e}") from e
        except (UnidentifiedImageError, OSError) as e:
            raise InvalidInput(f"undecodable image data ({len(data)} bytes): {e}") from e
        if img.format not in ("JPEG", "PNG", "WEBP"):
            img.close()
            raise InvalidInput(f"unsupported image format {img.format}; send JPEG, PNG or WebP")
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
