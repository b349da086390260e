"""An item's plan: what it will produce (pieces, embedding rows, frames), known from its header or shape
before any decoding. The encoder plans with it to check budgets and size its work; a consumer plans
with the same rules (`MediaPlanner.for_model(info)`) to lay out placeholders before the encoder runs.

Only the JPEG, PNG and WebP decoders ever see an image item's bytes (`open_image`): others, e.g. SGI's,
fail on junk with errors that are not the caller's.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from encoder_service.contract import video
from encoder_service.contract.errors import InvalidInput
from encoder_service.contract.media import MediaInput, Modality, SampledFrames, VideoSampling
from encoder_service.contract.tokens import (
    DynamicResolution,
    Size,
    TilingSpec,
    VideoFrameGeometry,
    count_dynamic_tokens,
    count_frame_tokens,
    count_image_tiles,
    count_image_tokens,
    dynamic_image_size,
    retained_token_count,
    video_frame_size,
)

if TYPE_CHECKING:
    from encoder_service.contract.model_info import ModelInfo

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # what an IMAGE item may be; GIF and the rest are refused
# PIL modes JPEG/PNG/WebP decode to. 8-bit ones convert to RGB as they are (alpha dropped, palettes
# expanded; 16-bit-per-channel RGB PNGs already arrive as 8-bit "RGB"); 16-bit grey is rescaled.
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I"})


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
        """Bytes of an image decoded to RGB at its own size (what a worker writes for device tiling)."""
        return self.decode_pixels * 3


@dataclass(frozen=True)
class PlanningRules:
    """Everything a plan depends on: the model's geometry (GetModelInfo carries it) and the input limits."""

    tiling: TilingSpec = dataclasses.field(default_factory=TilingSpec)
    dynamic: DynamicResolution | None = None  # images as one variable-size sequence each, when set
    video_frames: VideoFrameGeometry | None = None  # frames resized to a patch budget, when set
    video_pruning_rate: float = 0.0  # EVS rate for videos whose request does not set one
    default_video_frames: int = 16  # frames sampled from a video container when the request does not say
    # Guards against decompression bombs and absurd inputs.
    max_image_pixels: int = 8192 * 8192
    max_video_frames: int = 256


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """An image item's bytes opened (header read, nothing decoded yet) by the allowed decoders only."""
    if not isinstance(data, (bytes, bytearray)) or len(data) == 0:
        raise InvalidInput("empty image data")
    try:
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
    try:
        check_size(img.width, img.height, max_pixels)
    except InvalidInput:
        img.close()
        raise
    return img


def check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise InvalidInput(f"zero-size image ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidInput(f"image {width}x{height} exceeds {max_pixels} pixels")


def check_pixels(data: np.ndarray, ndim: int, max_pixels: int) -> None:
    """Raw pixels are uint8 [H, W, 3] (ndim 3) or [F, H, W, 3] (ndim 4), each frame within the limit."""
    if data.dtype != np.uint8 or data.ndim != ndim or data.shape[-1] != 3:
        want = "[H, W, 3]" if ndim == 3 else "[F, H, W, 3]"
        raise InvalidInput(f"raw pixels must be uint8 {want}, got {data.dtype} {list(data.shape)}")
    check_size(data.shape[-2], data.shape[-3], max_pixels)


class MediaPlanner:
    """Plans items from their headers or shapes (no decoding)."""

    def __init__(self, rules: PlanningRules):
        self.rules = rules

    @classmethod
    def for_model(cls, info: ModelInfo) -> "MediaPlanner":
        """The rules a model's GetModelInfo describes (a consumer's planner)."""
        return cls(PlanningRules(tiling=info.tiling, dynamic=info.dynamic, video_frames=info.video_frames,
                                 video_pruning_rate=info.video_pruning_rate,
                                 default_video_frames=info.default_video_frames or PlanningRules.default_video_frames))

    @property
    def tiling(self) -> TilingSpec:
        return self.rules.tiling

    def plan(self, item: MediaInput) -> ItemPlan:
        """Pieces and tokens an item will produce, from its header/shape only."""
        rules = self.rules
        if item.modality == Modality.IMAGE:
            w, h = self.image_size(item.data)
            return dataclasses.replace(self.plan_image(w, h), decode_pixels=w * h, image_size=(h, w))
        if item.modality == Modality.VIDEO:
            sampled = None
            if isinstance(item.data, (bytes, bytearray)):
                probe = video.probe(item.data, item.sampling or VideoSampling(), rules.default_video_frames,
                                    rules.max_video_frames)
                check_size(probe.width, probe.height, rules.max_image_pixels)
                sampled, num_frames = SampledFrames(probe.indices, probe.fps), len(probe.indices)
                (width, height), decode_pixels = (probe.width, probe.height), probe.width * probe.height * num_frames
            else:
                num_frames = self.num_frames(item.data)
                sizes = list(map(self.frame_size, item.data))
                (width, height), decode_pixels = sizes[0], sum(w * h for w, h in sizes)
            size = video_frame_size(width, height, rules.tiling, rules.video_frames)
            geometry = rules.video_frames
            per_frame = (rules.tiling.tokens_per_tile if geometry is None
                         else count_frame_tokens(size, geometry.patch_size, geometry.downsample))
            q = rules.video_pruning_rate if item.pruning_rate is None else item.pruning_rate
            try:
                tokens = retained_token_count(per_frame, num_frames, q)
            except ValueError as e:
                raise InvalidInput(str(e)) from None
            return ItemPlan((size,) * num_frames, tokens, (per_frame,) * num_frames, q, sampled, decode_pixels)
        raise InvalidInput(f"unknown modality {item.modality!r}")

    def plan_image(self, width: int, height: int) -> ItemPlan:
        if self.rules.dynamic is not None:
            return ItemPlan((dynamic_image_size(width, height, self.rules.dynamic),),
                            count_dynamic_tokens(width, height, self.rules.dynamic))
        n = count_image_tiles(width, height, self.tiling)
        return ItemPlan(((self.tiling.tile_size,) * 2,) * n, count_image_tokens(width, height, self.tiling))

    def image_size(self, data: bytes | np.ndarray) -> tuple[int, int]:
        """(width, height) of an image item, from its header or shape."""
        if isinstance(data, np.ndarray):
            check_pixels(data, 3, self.rules.max_image_pixels)
            return data.shape[1], data.shape[0]
        with open_image(data, self.rules.max_image_pixels) as img:
            return img.width, img.height

    def frame_size(self, frame: bytes | np.ndarray) -> tuple[int, int]:
        """(width, height) of one frame from its header (checked like an image's)."""
        if isinstance(frame, np.ndarray):
            return frame.shape[1], frame.shape[0]
        return self.image_size(frame)

    def num_frames(self, data) -> int:
        """Frames of a video given as raw pixels or a list of encoded frames (checked against the limit)."""
        if isinstance(data, np.ndarray):
            check_pixels(data, 4, self.rules.max_image_pixels)
            n = data.shape[0]
        elif isinstance(data, list):
            n = len(data)
        else:
            raise InvalidInput("a video is a uint8 array [F, H, W, 3] or a list of encoded frames")
        if n == 0:
            raise InvalidInput("video has no frames")
        if n > self.rules.max_video_frames:
            raise InvalidInput(f"video has {n} frames, more than the limit {self.rules.max_video_frames}")
        return n
