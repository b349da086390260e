"""Engine throughput on a mix of image sizes: one packed ragged stream vs images one by one.

Both sides run the same engine on the same preprocessed tiles in one process;
preprocessing (JPEG decode, tiling) is timed separately since it is CPU work
that a deployment overlaps with the GPU.

    python -m bench.encoder_throughput                       # CPU, tiny model
    python -m bench.encoder_throughput --preset radio-h --device cuda --images 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import device_name, interleaved_medians, jpeg_mix, preset_checkpoint
from encoder_service.config import PRESETS, EngineConfig
from encoder_service.engine import EncoderEngine
from encoder_service.processor import MediaInput, Modality


def profile_one_batch(engine: EncoderEngine, processed) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        engine.run(processed)
    key = "cuda_time_total" if engine.device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--mix", default="serving", choices=["serving", "small"])
    p.add_argument("--max-tokens-per-batch", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--preprocess-threads", type=int, default=4)
    p.add_argument("--workdir", default=None)
    p.add_argument("--profile", action="store_true", help="print the top ops of one packed run")
    args = p.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-"))
    engine = EncoderEngine(
        EngineConfig(
            checkpoint=str(preset_checkpoint(args.preset, workdir)),
            device=args.device,
            dtype=args.dtype,
            attention_backend=args.attention_backend,
            max_tokens_per_batch=args.max_tokens_per_batch,
            max_tokens_per_request=1 << 30,
            max_items_per_request=1 << 20,
            preprocess_threads=args.preprocess_threads,
        )
    )
    items = [MediaInput(Modality.IMAGE, data) for data in jpeg_mix(args.images, args.mix)]

    t0 = time.perf_counter()
    processed = engine.prepare(items)
    preprocess_s = time.perf_counter() - t0
    tiles = sum(p.num_tiles for p in processed)
    tokens = sum(engine.piece_rows(size) for p in processed for size in p.sizes)
    vit_tokens = sum(engine.piece_tokens(size) for p in processed for size in p.sizes)

    medians = interleaved_medians(
        {
            "packed": lambda: engine.run(processed),
            "one_by_one": lambda: [engine.run([p]) for p in processed],
            # Output left on the device: the ViT alone, without the device-to-host copy.
            "packed_on_device": lambda: engine.run(processed, output_device=str(engine.device)),
        },
        args.repeats,
    )
    packed_s, single_s, device_s = medians["packed"], medians["one_by_one"], medians["packed_on_device"]
    if args.profile:
        profile_one_batch(engine, processed)

    result = {
        "bench": "encoder_throughput",
        "device": device_name(engine.device),
        "preset": args.preset,
        "mix": args.mix,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "attention": engine.attention.name,
        "images": len(items),
        "tiles": tiles,
        "vit_tokens": vit_tokens,
        "output_tokens": tokens,
        "max_tokens_per_batch": args.max_tokens_per_batch,
        "preprocess_images_per_s": round(len(items) / preprocess_s, 1),
        "packed_tiles_per_s": round(tiles / packed_s, 1),
        "packed_vit_tokens_per_s": round(vit_tokens / packed_s),
        "packed_on_device_tiles_per_s": round(tiles / device_s, 1),
        "one_by_one_tiles_per_s": round(tiles / single_s, 1),
        "packed_over_one_by_one": round(single_s / packed_s, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
