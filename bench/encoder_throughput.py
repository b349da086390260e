"""Engine throughput on a mix of image sizes: one packed ragged stream vs images one by one,
and the forward's kernel variants side by side (model FLOP/s and MFU next to tiles/s).

All runs share the same preprocessed tiles in one process; preprocessing (JPEG decode,
tiling) is timed separately since it is CPU work that a deployment overlaps with the GPU.
Variants (EngineConfig fields): "eager" = SDPA per length group, exact GELU as its own pass,
unfused norms; "fast" = the defaults (auto attention, GELU in the matmul epilogue on CUDA);
"fast+compile" = fast plus torch.compile'd residual+norm.

    python -m bench.encoder_throughput                       # CPU, tiny model
    python -m bench.encoder_throughput --preset radio-h --device cuda --images 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import device_name, interleaved_medians, jpeg_mix, mfu, model_flops, preset_checkpoint
from encoder_service.config import PRESETS, EngineConfig
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.engine import EncoderEngine

VARIANTS = {
    "eager": dict(attention_backend="torch", gelu_epilogue=False, compile_norms=False),
    "fast": dict(attention_backend="auto", gelu_epilogue=None, compile_norms=False),
    "fast+compile": dict(attention_backend="auto", gelu_epilogue=None, compile_norms=True),
}


def profile_one_batch(engine: EncoderEngine, processed) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        engine.run(processed)
    key = "cuda_time_total" if engine.device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--variants", default="eager,fast", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--mix", default="serving", choices=["serving", "small"])
    p.add_argument("--max-tokens-per-batch", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--preprocess-threads", type=int, default=4)
    p.add_argument("--workdir", default=None)
    p.add_argument("--profile", action="store_true", help="print the top ops of one packed run of the last variant")
    args = p.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-"))
    checkpoint = str(preset_checkpoint(args.preset, workdir))
    engines = {}
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        engines[name] = EncoderEngine(EngineConfig(
            checkpoint=checkpoint, device=args.device, dtype=args.dtype,
            max_tokens_per_batch=args.max_tokens_per_batch, max_tokens_per_request=1 << 30,
            max_items_per_request=1 << 20, preprocess_threads=args.preprocess_threads, **VARIANTS[name],
        ))
        print(f"{name}: engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
    main_name = list(engines)[-1]
    engine = engines[main_name]
    items = [MediaInput(Modality.IMAGE, data) for data in jpeg_mix(args.images, args.mix)]

    t0 = time.perf_counter()
    processed = engine.prepare(items)
    preprocess_s = time.perf_counter() - t0
    tiles = sum(p.num_tiles for p in processed)
    tokens = sum(engine.piece_rows(size) for p in processed for size in p.sizes)
    seq_lens = [engine.piece_tokens(size) for p in processed for size in p.sizes]
    flops = model_flops(engine, seq_lens, tokens)

    fns = {f"packed:{name}": (lambda e=e: e.run(processed)) for name, e in engines.items()}
    fns["one_by_one"] = lambda: [engine.run([p]) for p in processed]
    # Output left on the device: the forward alone, without the device-to-host copy.
    fns["packed_on_device"] = lambda: engine.run(processed, output_device=str(engine.device))
    medians = interleaved_medians(fns, args.repeats)
    if args.profile:
        profile_one_batch(engine, processed)

    variants = {}
    for name, e in engines.items():
        seconds = medians[f"packed:{name}"]
        tflops = flops / seconds / 1e12
        variants[name] = {
            "config": VARIANTS[name],
            "attention_choices": dict(getattr(e.attention, "choices", {})),
            "tiles_per_s": round(tiles / seconds, 1),
            "vit_tokens_per_s": round(sum(seq_lens) / seconds),
            "model_tflops": round(tflops, 1),
            "mfu": mfu(tflops, e.device),
            "speedup_over_first": round(medians[f"packed:{list(engines)[0]}"] / seconds, 3),
        }
    device_tflops = flops / medians["packed_on_device"] / 1e12
    result = {
        "bench": "encoder_throughput",
        "device": device_name(engine.device),
        "preset": args.preset,
        "mix": args.mix,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "images": len(items),
        "tiles": tiles,
        "vit_tokens": sum(seq_lens),
        "output_tokens": tokens,
        "gflop_per_vit_token": round(flops / sum(seq_lens) / 1e9, 3),
        "max_tokens_per_batch": args.max_tokens_per_batch,
        "preprocess_images_per_s": round(len(items) / preprocess_s, 1),
        "variants": variants,
        f"packed_on_device_tiles_per_s:{main_name}": round(tiles / medians["packed_on_device"], 1),
        f"packed_on_device_mfu:{main_name}": mfu(device_tflops, engine.device),
        f"one_by_one_tiles_per_s:{main_name}": round(tiles / medians["one_by_one"], 1),
        f"packed_over_one_by_one:{main_name}": round(medians["one_by_one"] / medians[f"packed:{main_name}"], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
