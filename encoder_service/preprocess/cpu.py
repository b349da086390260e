"""Media -> pieces on the host CPU: decode, resize to the planned sizes, cut into tiles.

What an item becomes (its pieces and their sizes) is its plan (`contract.plan`); this module makes
the pixels. Pieces are uint8 HWC (as decoded), stored back to back in one flat buffer
(`ItemPlan.nbytes`): normalisation happens on the model's device. This module imports no torch on
purpose (but for the "torch-aa" resampling some checkpoints ask for): the out-of-process
preprocessing workers run it, and a worker that starts in a fraction of a second is cheap to replace.
`preprocess.device` does the resize and tiling of images on a GPU instead, from decoded pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from encoder_service.config import ProcessorConfig
from encoder_service.contract.errors import InvalidInput
from encoder_service.contract.media import MediaInput, Modality, SampledFrames
from encoder_service.contract.plan import HIGH_BIT_DEPTH_MODES, ItemPlan, MediaPlanner, check_pixels, open_image
from encoder_service.contract.tokens import Size, TilingSpec, choose_grid
from encoder_service.video.decode import decode_sampled

if TYPE_CHECKING:  # annotations only: the workers run without torch
    import torch


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


def split_pieces(flat: np.ndarray, sizes: tuple[Size, ...] | list[Size]) -> list[np.ndarray]:
    out, pos = [], 0
    for h, w in sizes:
        out.append(flat[pos : pos + h * w * 3].reshape(h, w, 3))
        pos += h * w * 3
    return out


class CpuPreprocessor:
    """Decodes media and cuts them into pieces on the host CPU (the preprocessing workers run it)."""

    def __init__(self, cfg: ProcessorConfig):
        self.cfg = cfg
        self.planner = MediaPlanner(cfg.planning())

    @property
    def tiling(self) -> TilingSpec:
        return self.cfg.tiling

    @property
    def tile_shape(self) -> tuple[int, int, int]:
        return (self.tiling.tile_size, self.tiling.tile_size, 3)

    def process(self, item: MediaInput) -> ProcessedItem:
        """Decode and tile into a new array (the in-process path)."""
        plan = self.planner.plan(item)
        pixels = np.empty(plan.nbytes, dtype=np.uint8)
        times = self.process_into(item, pixels, plan)
        frames = dataclasses.replace(plan.frames, times=tuple(times)) if plan.frames else None
        return ProcessedItem(pixels, plan.sizes, list(plan.tokens_per_frame), plan, frames)

    def process_into(self, item: MediaInput, out: np.ndarray, plan: ItemPlan | None = None) -> list[float]:
        """Decode `item` into `out` (flat uint8 of the plan's `nbytes`, e.g. shared memory), piece by piece.
        Returns the sampled frames' times (s) of a video container, else []."""
        plan = plan or self.planner.plan(item)
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
        device path's share of the work (`preprocess.device`: it resizes and tiles on the GPU)."""
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

        decode_sampled(data, indices, consume)
        return actual

    def frames_into(self, data: np.ndarray | list[bytes], out: np.ndarray) -> int:
        """Frames into `out` [F, h, w, 3], each decoded and resized before the next is decoded (one
        full-size frame in memory at a time); returns frames written."""
        h, w = out.shape[1:3]
        count = self.planner.num_frames(data)
        for i, frame in enumerate(data):
            image = Image.fromarray(frame, "RGB") if isinstance(frame, np.ndarray) else self.load_image(frame)
            out[i] = self.resize(image, w, h)
        return count

    # -- decoding: every failure is the caller's, so InvalidInput

    def load_image(self, data: bytes | np.ndarray) -> Image.Image:
        if isinstance(data, np.ndarray):
            check_pixels(data, 3, self.cfg.max_image_pixels)
            return Image.fromarray(data, "RGB")
        with open_image(data, self.cfg.max_image_pixels) as img:
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
