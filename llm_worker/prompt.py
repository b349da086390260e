"""Prompt layout: `<image>` / `<video>` markers become framed runs of placeholder ids.

Each media item's embedding rows map, in order, onto its placeholder positions.
- an image is one run: `<img> ctx*n </img>`;
- a video is one run per frame, each after its own separator, as Nemotron Nano VL's processor
  (vLLM's `NanoNemotronVLProcessor.get_video_repl`) lays videos out:
  `Frame 1 sampled at 0.00 seconds: <img> ctx*n1 </img>\nFrame 2 sampled at 0.49 seconds: ...`
  (`Frame 1: `, `\nFrame 2: ` when the frames carry no timestamps). The time printed is the
  processor's, `nemotron_frame_time`: from the frame's index in the stream and the stream's rate.

Every separator and every `<img>`/`</img>` is tokenized on its own, so a video's region has the
same length however its rows split over frames. That is what EVS needs: before encoding only a
pruned video's total K is known, so its region is laid out as [K, 0, ..., 0]; once the encoder
reports how many tokens each frame kept, `PromptLayout.with_frame_counts` rebuilds the region with
the real counts, same total length, nothing else in the prompt moving.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from llm_worker.tokenizer import Tokenizer

MEDIA_MARKER = re.compile(r"<image>|<video>")


@dataclass(frozen=True)
class PlaceholderRun:
    offset: int  # prompt position of the first placeholder
    length: int


@dataclass(frozen=True)
class MediaSpan:
    """Where one media item's embedding rows go in the prompt."""

    runs: tuple[PlaceholderRun, ...]
    start: int  # first prompt position of the item's region (separators and tags included)
    separators: tuple[tuple[int, ...], ...] = ()  # a video's per-frame separator ids; () for an image

    @property
    def offset(self) -> int:
        return self.runs[0].offset

    @property
    def end(self) -> int:
        """One past the last placeholder position."""
        return self.runs[-1].offset + self.runs[-1].length

    @property
    def length(self) -> int:
        """Embedding rows the item must supply."""
        return sum(r.length for r in self.runs)

    @property
    def frame_counts(self) -> list[int]:
        return [r.length for r in self.runs]

    def positions(self) -> list[int]:
        return [r.offset + i for r in self.runs for i in range(r.length)]


@dataclass(frozen=True)
class PromptLayout:
    token_ids: list[int]
    spans: list[MediaSpan]  # one per marker, in prompt order
    markers: list[str]  # "image" / "video", per span
    media_tokens: tuple[int, int, int] = (-1, -1, -1)  # (<img>, </img>, placeholder) ids it was built with

    def with_frame_counts(self, index: int, counts: list[int]) -> "PromptLayout":
        """The layout with media item `index` (a video) re-laid out with `counts` rows per frame.

        The region keeps its length (same total, same frames), so no other position moves."""
        span = self.spans[index]
        counts = list(counts)
        if len(counts) != len(span.runs) or sum(counts) != span.length or min(counts, default=0) < 0:
            raise ValueError(f"media item {index}: cannot re-lay out {span.frame_counts} as {counts} "
                             f"(the frame count and the total must stay)")
        ids, runs = _frames(span.start, counts, span.separators or ((),) * len(counts), self.media_tokens)
        token_ids = self.token_ids[: span.start] + ids + self.token_ids[span.start + len(ids) :]
        spans = list(self.spans)
        spans[index] = replace(span, runs=tuple(runs))
        return replace(self, token_ids=token_ids, spans=spans)


def count_markers(text: str) -> list[str]:
    return [m.group(0)[1:-1] for m in MEDIA_MARKER.finditer(text)]


def frame_separator(index: int, time_s: float | None) -> str:
    """The text before frame `index` (0-based) of a video, as Nemotron Nano VL's processor writes it:
    every separator after the first starts a new line ("to match training format")."""
    newline = "\n" if index > 0 else ""
    if time_s is None:
        return f"{newline}Frame {index + 1}: "
    return f"{newline}Frame {index + 1} sampled at {time_s:.2f} seconds: "


def nemotron_frame_time(frame_index: int, fps: float) -> float:
    """The time Nemotron Nano VL's prompt gives a frame: its index in the stream times the frame
    duration in whole milliseconds (`int(1000 / fps)`, as vLLM's model file computes it), so
    frame 150 of a 30 fps video is 4.95 s, not 5.00."""
    return frame_index * int(1000 / fps) / 1000.0


@dataclass(frozen=True)
class MediaRegion:
    """What the prompt needs of one media item before encoding."""

    counts: list[int]  # placeholder rows per run (one run for an image; per frame for a video)
    frame_times: list[float] | None = None  # the times a video's separators print (s), when known
    video: bool = False


def _frames(start: int, counts: list[int], separators, media_tokens) -> tuple[list[int], list[PlaceholderRun]]:
    img_start, img_end, context = media_tokens
    ids: list[int] = []
    runs = []
    for count, separator in zip(counts, separators):
        ids += separator
        ids.append(img_start)
        runs.append(PlaceholderRun(start + len(ids), count))
        ids += [context] * count
        ids.append(img_end)
    return ids, runs


def layout_prompt(text: str, regions: list[MediaRegion], tokenizer: Tokenizer, add_bos: bool = True) -> PromptLayout:
    """Expand the markers of `text` into the regions of its media items (in order)."""
    markers = count_markers(text)
    if len(markers) != len(regions):
        raise ValueError(f"prompt has {len(markers)} media markers but {len(regions)} media items were given")
    bos = getattr(tokenizer, "bos_id", None)
    ids: list[int] = [bos] if add_bos and bos is not None else []
    media_tokens = (tokenizer.media.start, tokenizer.media.end, tokenizer.media.context)
    spans: list[MediaSpan] = []
    for i, piece in enumerate(MEDIA_MARKER.split(text)):
        ids += tokenizer.encode(piece)
        if i == len(regions):
            break
        region = regions[i]
        if not region.counts or min(region.counts) < 0 or (not region.video and min(region.counts) == 0):
            raise ValueError(f"media item {i} has placeholder runs {region.counts}")
        if region.frame_times is not None and len(region.frame_times) != len(region.counts):
            raise ValueError(f"media item {i}: {len(region.frame_times)} frame times for {len(region.counts)} frames")
        separators: tuple[tuple[int, ...], ...] = ()
        if region.video:
            times = region.frame_times or [None] * len(region.counts)
            separators = tuple(tuple(tokenizer.encode(frame_separator(f, t))) for f, t in enumerate(times))
        start = len(ids)
        frame_ids, runs = _frames(start, region.counts, separators or ((),), media_tokens)
        ids += frame_ids
        spans.append(MediaSpan(tuple(runs), start, separators))
    return PromptLayout(ids, spans, markers, media_tokens)
