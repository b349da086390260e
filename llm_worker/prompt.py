"""Prompt layout: `<image>` / `<video>` markers become framed runs of placeholder ids.

Each media item's embedding rows map, in order, onto its placeholder positions.
An image is one run `<img> ctx*n </img>`; a video is one such run per frame, so
its positions are several runs (frames may differ in length after EVS pruning).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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

    def positions(self) -> list[int]:
        return [r.offset + i for r in self.runs for i in range(r.length)]


@dataclass(frozen=True)
class PromptLayout:
    token_ids: list[int]
    spans: list[MediaSpan]  # one per marker, in prompt order
    markers: list[str]  # "image" / "video", per span


def count_markers(text: str) -> list[str]:
    return [m.group(0)[1:-1] for m in MEDIA_MARKER.finditer(text)]


def layout_prompt(
    text: str, media_runs: list[list[int]], tokenizer: Tokenizer, add_bos: bool = True
) -> PromptLayout:
    """Expand markers; `media_runs[i]` is the placeholder count of each run of item i.

    For an image that is `[count_image_tokens(w, h)]`; for a video, tokens per frame.
    """
    markers = count_markers(text)
    if len(markers) != len(media_runs):
        raise ValueError(f"prompt has {len(markers)} media markers but {len(media_runs)} media items were given")
    bos = getattr(tokenizer, "bos_id", None)
    ids: list[int] = [bos] if add_bos and bos is not None else []
    spans: list[MediaSpan] = []
    pieces = MEDIA_MARKER.split(text)
    tok = tokenizer.media
    for i, piece in enumerate(pieces):
        ids += tokenizer.encode(piece)
        if i == len(media_runs):
            break
        runs = []
        for count in media_runs[i]:
            if count <= 0:
                raise ValueError(f"media item {i} has a run of {count} placeholders")
            ids.append(tok.start)
            runs.append(PlaceholderRun(len(ids), count))
            ids += [tok.context] * count
            ids.append(tok.end)
        spans.append(MediaSpan(tuple(runs)))
    return PromptLayout(ids, spans, markers)
