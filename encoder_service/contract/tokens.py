"""The token-count rules: how many embedding rows an item produces, from its size alone, so a consumer
lays out placeholders before the encoder runs. The geometry dataclasses carry everything the rules need
(GetModelInfo sends every field; protos/encoder.proto spells the algorithms out).

An item becomes one or more *pieces*, each one ViT sequence of its own pixel size:
- images, tiled (Nemotron Nano VL's fixed tiling): resized to the `cols x rows` grid of tiles whose
  aspect ratio is closest to its own (at most `max_tiles`), plus a thumbnail when there is more than one;
- images, dynamic resolution: ONE piece, the image scaled to a patch budget with its aspect ratio kept;
- video frames: one tile-sized piece each, or each resized to a patch budget (`VideoFrameGeometry`);
  an EVS-pruned video keeps `retained_token_count` of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

Size = tuple[int, int]  # (height, width) in pixels


@dataclass(frozen=True)
class TilingSpec:
    """Dynamic tiling as Nemotron Nano VL does it: up to `max_tiles` tiles plus a thumbnail.

    Everything the token-count function needs, so that an LLM worker can lay out
    placeholders before the encoder runs (GetModelInfo carries every field).
    """

    tile_size: int = 512
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    tokens_per_tile: int = 256


@dataclass(frozen=True)
class DynamicResolution:
    """Nemotron Nano VL's dynamic resolution: an image becomes ONE sequence of about
    `max_num_patches` patches (at least `min_num_patches`), its aspect ratio kept and both
    sides an even number of patches (so the pixel shuffle divides them).

    Like TilingSpec, it carries everything the token count needs (GetModelInfo sends it).
    """

    patch_size: int = 16
    downsample: int = 2
    min_num_patches: int = 1024
    max_num_patches: int = 13312

    def __post_init__(self):
        if not 0 < self.min_num_patches <= self.max_num_patches:
            raise ValueError(f"need 0 < min_num_patches <= max_num_patches, got "
                             f"{self.min_num_patches}, {self.max_num_patches}")


@dataclass(frozen=True)
class VideoFrameGeometry:
    """Video frames resized to a patch budget instead of one square tile (Nemotron Nano VL's
    `video_target_num_patches`, or `video_target_img_size` as ceil(size / patch)^2 patches).

    Square: side = floor(sqrt(N)) patches, floored to a multiple of `downsample` (at least it).
    Aspect kept: ph = round(sqrt(N / aspect)), pw = round(sqrt(N * aspect)) (aspect = w / h, at
    least 1 each), both raised to a multiple of `downsample` if that stays within N, else both
    lowered (at least `downsample`). Tokens per frame = (ph / downsample) * (pw / downsample).
    """

    target_num_patches: int
    maintain_aspect_ratio: bool = False
    patch_size: int = 16
    downsample: int = 2

    def __post_init__(self):
        if self.target_num_patches <= 0:
            raise ValueError(f"video target_num_patches must be positive, got {self.target_num_patches}")


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


def check_rate(q: float) -> None:
    """An EVS pruning rate q is in [0, 1)."""
    if not 0.0 <= q < 1.0:
        raise ValueError(f"video pruning rate must be in [0, 1), got {q}")


def retained_token_count(tokens_per_frame: int, num_frames: int, q: float) -> int:
    """Tokens an EVS-pruned video keeps: known before encoding, so placeholders can be sized first."""
    check_rate(q)
    return max(tokens_per_frame, int(tokens_per_frame * num_frames * (1.0 - q)))
