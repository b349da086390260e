"""Image preprocessing on the device vs the CPU path: pixels, embeddings and cost (issue 19, first part).

For the serving mix of JPEGs (random-noise content, the worst case for rounding differences, and a
smooth variant closer to photos): the CPU path's tiles (PIL decode + PIL bicubic, `ImageProcessor`)
against the device path's (`preprocess_device`: nvJPEG decode + Pillow's bicubic passes on the GPU),
and against host decode + device resize (which isolates the resize). Reported: per-pixel |difference|
(max, p99, share of values off by more than 1 grey level), the embeddings' cosine and relative error
on the preset, and throughput per content: images/s, tiles/s and host CPU-seconds per 1000 tiles of
one thread for the CPU path, the decode alone (a worker's share on the device path) and each device path.

    python -m bench.preprocess_numerics --preset radio-h --device cuda
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import IMAGE_MIXES, device_name, jpeg_mix, preset_checkpoint
from encoder_service.config import EngineConfig
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.engine import EncoderEngine
from encoder_service.preprocess.cpu import ProcessedItem
from encoder_service.preprocess.device import DeviceTiler, decode_nvjpeg, host_decoded


def smooth_jpegs(seed: int = 1) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for w, h in IMAGE_MIXES["serving"]:
        coarse = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def pixel_stats(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"max": int(d.max()), "p99": float(np.percentile(d, 99)), "over_1": round(float((d > 1).mean()), 5),
            "mean": round(float(d.mean()), 4)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    engine = EncoderEngine(EngineConfig(checkpoint=str(preset_checkpoint(args.preset, workdir)), device=args.device,
                                        max_tokens_per_request=1 << 30))
    processor = engine.preprocessor
    tiler = DeviceTiler(processor.cfg, args.device)

    def host_path(data: bytes, plan) -> torch.Tensor:
        return tiler.pieces(host_decoded(processor, MediaInput(Modality.IMAGE, data), plan, args.device), plan)

    paths = {"host decode + device resize": host_path}
    if args.device == "cuda":
        paths["device (nvJPEG + device resize)"] = lambda data, plan: tiler.pieces(decode_nvjpeg(data, args.device), plan)
    print(json.dumps({"bench": "preprocess_numerics", "device": device_name(torch.device(args.device)),
                      "preset": args.preset, "paths": list(paths)}), flush=True)
    for content, jpegs in (("noise", jpeg_mix(len(IMAGE_MIXES["serving"]), seed=7)), ("smooth", smooth_jpegs())):
        items = [MediaInput(Modality.IMAGE, data) for data in jpegs]
        plans = [processor.planner.plan(item) for item in items]
        cpu = [processor.process(item).pixels for item in items]
        for name, path in paths.items():
            pieces = [path(item.data, plan).cpu().numpy() for item, plan in zip(items, plans)]
            stats = pixel_stats(np.concatenate(cpu), np.concatenate(pieces))
            ref = engine.run([ProcessedItem(px, plan.sizes, [], plan) for px, plan in zip(cpu, plans)]).embeddings.float()
            got = engine.run([ProcessedItem(px, plan.sizes, [], plan) for px, plan in zip(pieces, plans)]).embeddings.float()
            cosine = torch.nn.functional.cosine_similarity(ref, got, dim=-1)
            print(json.dumps({"content": content, "path": name, "pixels_vs_cpu": stats,
                              "embedding_cosine_min": round(float(cosine.min()), 6),
                              "embedding_cosine_mean": round(float(cosine.mean()), 6),
                              "embedding_rel_error": round(float((got - ref).norm() / ref.norm()), 6)}), flush=True)
    # Throughput: the same 8 images of each content, preprocessed one after another.
    def timed(fn) -> tuple[float, float]:
        fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        wall, cpu_s = [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            wall.append(time.perf_counter() - t0)
            cpu_s.append(time.process_time() - c0)
        return float(np.median(wall)), float(np.median(cpu_s))

    for content, jpegs in (("noise", jpeg_mix(len(IMAGE_MIXES["serving"]), seed=7)), ("smooth", smooth_jpegs())):
        items = [MediaInput(Modality.IMAGE, data) for data in jpegs]
        plans = [processor.planner.plan(item) for item in items]
        tiles = sum(plan.num_tiles for plan in plans)
        buffers = [np.empty(plan.decoded_nbytes, dtype=np.uint8) for plan in plans]
        rows = [("cpu path, 1 thread", *timed(lambda: [processor.process(item) for item in items])),
                ("host decode only (what a worker does)",
                 *timed(lambda: [processor.decode_into(item, buf) for item, buf in zip(items, buffers)]))]
        for name, path in paths.items():
            rows.append((name, *timed(lambda: [path(item.data, plan) for item, plan in zip(items, plans)])))
        for name, wall, cpu_s in rows:
            print(json.dumps({"throughput": name, "content": content, "images_per_s": round(len(items) / wall, 1),
                              "tiles_per_s": round(tiles / wall, 1),
                              "cpu_s_per_1000_tiles": round(1000 * cpu_s / tiles, 2)}), flush=True)

if __name__ == "__main__":
    main()
