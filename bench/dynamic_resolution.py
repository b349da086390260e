"""Dynamic resolution vs fixed tiling on the serving mix, one Nemotron-layout checkpoint, side by side.

A random checkpoint in Nemotron Nano VL's published layout (RADIO ViT, CPE, mlp1) is written
once with dynamic resolution on (`min/max_num_patches`) and served twice: as written (each
image ONE sequence of up to `max` patches: ragged batches of very different lengths) and
with the same weights under fixed 512-px tiling (every sequence 1024 + prefix tokens).
Reports throughput, the distribution of sequence lengths, and model FLOP/s.

    python -m bench.dynamic_resolution --model vit_tiny_patch16_224 --patches 256,1024   # CPU
    python -m bench.dynamic_resolution --device cuda --images 64                           # GPU, RADIO-H
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import device_name, interleaved_medians, jpeg_mix, mfu, model_flops
from encoder_service.config import EngineConfig
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.engine import EncoderEngine
from tests.nemotron_fixture import write_nemotron_checkpoint


def write_pair(root: Path, model: str, patches: tuple[int, int], projector: int, llm: int) -> tuple[Path, Path]:
    """The dynamic-resolution checkpoint and a tiled twin sharing its shards."""
    dynamic, tiled = root / "dynamic", root / "tiled"
    if not (dynamic / "config.json").exists():
        write_nemotron_checkpoint(dynamic, model=model, tile=512, cpe_max_size=2048, projector_hidden=projector,
                                  llm_hidden=llm, dynamic=patches, dtype=torch.bfloat16)
    tiled.mkdir(exist_ok=True)
    for f in dynamic.iterdir():
        if f.suffix != ".json" and not (tiled / f.name).exists():
            (tiled / f.name).symlink_to(f.resolve())
    shutil.copy(dynamic / "model.safetensors.index.json", tiled)
    config = json.loads((dynamic / "config.json").read_text())
    for key in ("min_num_patches", "max_num_patches"):
        config["vision_config"]["args"].pop(key)
    (tiled / "config.json").write_text(json.dumps(config))
    return dynamic, tiled


def percentile(values: list[int], q: float) -> int:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vit_huge_patch16_224")
    p.add_argument("--patches", default="1024,13312", help="min,max patches per dynamic-resolution image")
    p.add_argument("--projector-hidden", type=int, default=20480)
    p.add_argument("--llm-hidden", type=int, default=5120)
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--max-tokens-per-batch", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()

    lo, hi = (int(x) for x in args.patches.split(","))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-dyn-"))
    t0 = time.perf_counter()
    paths = write_pair(workdir, args.model, (lo, hi), args.projector_hidden, args.llm_hidden)
    write_s = time.perf_counter() - t0
    items = [MediaInput(Modality.IMAGE, data) for data in jpeg_mix(args.images, "serving")]
    runs, rows = {}, {}
    for name, path in zip(("dynamic", "tiled"), paths):
        engine = EncoderEngine(EngineConfig(checkpoint=str(path), device=args.device,
                                            max_tokens_per_batch=max(args.max_tokens_per_batch, hi + 64),
                                            max_tokens_per_request=1 << 30, max_items_per_request=1 << 20))
        processed = engine.prepare(items)
        seq_lens = [engine.piece_tokens(s) for p_ in processed for s in p_.sizes]
        out_rows = sum(engine.piece_rows(s) for p_ in processed for s in p_.sizes)
        runs[name] = (engine, processed, seq_lens, out_rows)
    medians = interleaved_medians({name: (lambda r=r: r[0].run(r[1])) for name, r in runs.items()}, args.repeats)

    engine = runs["dynamic"][0]
    result = {"bench": "dynamic_resolution", "device": device_name(engine.device), "model": args.model,
              "dtype": str(engine.dtype).removeprefix("torch."), "attention": engine.attention.name,
              "images": len(items), "dynamic_patches": [lo, hi], "checkpoint_write_s": round(write_s, 1)}
    for name, (eng, processed, seq_lens, out_rows) in runs.items():
        seconds = medians[name]
        tflops = model_flops(eng, seq_lens, out_rows) / seconds / 1e12
        rows[name] = {
            "sequences": len(seq_lens),
            "vit_tokens": sum(seq_lens),
            "output_tokens": out_rows,
            "seq_len_min_p50_p90_max": [min(seq_lens), int(statistics.median(seq_lens)),
                                        percentile(seq_lens, 0.9), max(seq_lens)],
            "seconds": round(seconds, 4),
            "images_per_s": round(len(items) / seconds, 1),
            "vit_tokens_per_s": round(sum(seq_lens) / seconds),
            "output_tokens_per_s": round(out_rows / seconds),
            "model_tflops": round(tflops, 1),
            "mfu": mfu(tflops, engine.device),
        }
    result["runs"] = rows
    result["tiled_over_dynamic_time"] = round(medians["tiled"] / medians["dynamic"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
