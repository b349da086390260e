"""`encoder-service encode`: files in (images and videos), one tensor + per-item metadata out, saved as
safetensors (`embeddings` + metadata) or .npy + a JSON sidecar."""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from encoder_service.contract.media import MediaInput, Modality, VideoSampling
from encoder_service.contract.result import EncodeResult

VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".mov", ".avi"}


def media_from_files(paths: list[str], sampling: VideoSampling | None, pruning_rate: float | None) -> list[MediaInput]:
    """Each file as an item: a video container by its suffix (with the sampling and EVS rate), else an image."""
    items = []
    for path in map(Path, paths):
        data = path.read_bytes()
        if path.suffix.lower() in VIDEO_SUFFIXES:
            items.append(MediaInput(Modality.VIDEO, data, item_id=path.name, sampling=sampling,
                                    pruning_rate=pruning_rate))
        else:
            items.append(MediaInput(Modality.IMAGE, data, item_id=path.name))
    return items


def save(result: EncodeResult, path: str | Path, model_name: str) -> list[Path]:
    """The one tensor and its metadata: `.safetensors` (tensor `embeddings`, metadata `items` as JSON), or
    `.npy` (float32: numpy has no bfloat16, and widening is exact) + `<path>.json`. Returns the files written."""
    path = Path(path)
    meta = {"model": model_name, "dtype": str(result.embeddings.dtype).removeprefix("torch."),
            "shape": list(result.embeddings.shape), "items": [asdict(i) for i in result.items]}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"embeddings": result.embeddings.contiguous()}, str(path),
                  metadata={k: json.dumps(v) for k, v in meta.items()})
        return [path]
    if path.suffix == ".npy":
        np.save(path, result.embeddings.to(torch.float32).numpy())
        sidecar = path.with_suffix(".json")
        sidecar.write_text(json.dumps({**meta, "saved_as": "float32"}, indent=2))
        return [path, sidecar]
    raise ValueError(f"--out must end in .safetensors or .npy, not {path.suffix or 'nothing'}")


class Progress:
    """An elapsed-time line on stderr while a long call runs (updated in place on a terminal)."""

    def __init__(self, what: str):
        self.what, self._stop = what, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.perf_counter()

    def __enter__(self) -> "Progress":
        if sys.stderr.isatty():
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            print(f"\r{self.what}… {time.perf_counter() - self.started:.1f} s", end="", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            print("\r" + " " * (len(self.what) + 16) + "\r", end="", file=sys.stderr, flush=True)


def describe(items: list[MediaInput]) -> str:
    videos = sum(item.modality == Modality.VIDEO for item in items)
    return f"encoding {len(items)} item(s)" + (f", {videos} video(s)" if videos else "")
