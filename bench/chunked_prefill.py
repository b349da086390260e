"""Chunked prefill with the embedding cache vs re-encoding the images on every chunk.

A real gRPC encoder server (tiny ViT at Nemotron's geometry: 512 px tiles, 256 tokens/tile)
and the reference LLM engine run in one process; both variants run the same prompts, side
by side (alternating, median of the repeats), for each (chunk size, images per prompt) cell.
The baseline batches the items a chunk overlaps into one Encode per chunk. Encoder calls and items are counted
on the server.

    python -m bench.chunked_prefill
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import jpeg_mix, preset_checkpoint
from encoder_service.client.endpoint import EncoderClient
from encoder_service.config import EngineConfig
from encoder_service.contract.media import MediaInput, Modality
from encoder_service.serving.api.server import BackgroundServer, ServerConfig
from llm_worker.engine import GenerationRequest, LLMEngine, LLMWorkerConfig, Sequence
from llm_worker.media_fetch import MediaRef


class ReencodeEveryChunk(LLMEngine):
    """Baseline without the cache: each chunk sends ONE Encode for the items it overlaps, then slices."""

    def _admit(self, seqs: list[Sequence]) -> None:
        self._start_prefill(seqs)  # no fetch: media are encoded chunk by chunk

    def _prefill_chunk(self, seq: Sequence, n: int) -> None:
        start, end = seq.num_prefilled, seq.num_prefilled + n
        refs = [r for r in seq.media if r.span.offset < end and r.span.end > start]
        self._chunk_rows = {}
        if refs:
            self.encode_calls += 1
            result = self.encoder.encode([r.media for r in refs])
            self._chunk_rows = {id(r): rows for r, rows in zip(refs, result.split())}
        super()._prefill_chunk(seq, n)

    def _media_rows(self, ref: MediaRef) -> torch.Tensor:
        return self._chunk_rows[id(ref)]

    def _release(self, seq: Sequence) -> None:
        pass


def run_cell(engine_cls, client, llm_dir, chunk_size, prompt, media, counters) -> dict:
    engine = engine_cls(LLMWorkerConfig(model_dir=llm_dir, chunk_size=chunk_size, step_token_budget=chunk_size), client)
    calls0, items0 = counters.encode_calls, counters.items_encoded
    t0 = time.perf_counter()
    out = engine.generate([GenerationRequest(prompt, media, max_new_tokens=1)])[0]
    return {
        "seconds": time.perf_counter() - t0,
        "encode_calls": counters.encode_calls - calls0,
        "items_encoded": counters.items_encoded - items0,
        "prompt_tokens": out.prompt_tokens,
        "chunks": out.prefill_chunks,
        "token_ids": out.token_ids,
    }


def run_pair(client, llm_dir, chunk_size, prompt, media, counters, repeats: int) -> tuple[dict, dict]:
    """Both variants, alternating, `repeats` times each; the median time of each is kept."""
    runs: dict[str, list[dict]] = {"cached": [], "reencode": []}
    for _ in range(repeats):
        runs["cached"].append(run_cell(LLMEngine, client, llm_dir, chunk_size, prompt, media, counters))
        runs["reencode"].append(run_cell(ReencodeEveryChunk, client, llm_dir, chunk_size, prompt, media, counters))
    out = []
    for name in ("cached", "reencode"):
        first = dict(runs[name][0])
        first["seconds"] = statistics.median(r["seconds"] for r in runs[name])
        out.append(first)
    return out[0], out[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--chunk-sizes", default="256,512,1024,2048,4096")
    p.add_argument("--images", default="1,2,4,8")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from llm_worker.tiny import tiny_llm_dir

    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    llm_dir = str(tiny_llm_dir(workdir))
    engine_cfg = EngineConfig(checkpoint=str(preset_checkpoint("tiny-512", workdir)), max_tokens_per_request=1 << 20)
    with BackgroundServer(ServerConfig(port=0, engine=engine_cfg)) as server, EncoderClient(server.address) as client:
        client.wait_ready()
        for n_images in map(int, args.images.split(",")):
            # 1024x512 -> 2 tiles + thumbnail = 768 tokens per image at 256 tokens/tile.
            media = [MediaInput(Modality.IMAGE, data) for data in jpeg_mix(n_images, mix="wide", seed=n_images)]
            prompt = "Describe these: " + " then ".join(["<image>"] * n_images) + "."
            for chunk_size in map(int, args.chunk_sizes.split(",")):
                cached, naive = run_pair(client, llm_dir, chunk_size, prompt, media, server.counters, args.repeats)
                assert cached["token_ids"] == naive["token_ids"], "both variants must generate the same tokens"
                print(
                    json.dumps(
                        {
                            "bench": "chunked_prefill",
                            "images": n_images,
                            "chunk_size": chunk_size,
                            "prompt_tokens": cached["prompt_tokens"],
                            "chunks": cached["chunks"],
                            "cached_encode_calls": cached["encode_calls"],
                            "cached_items_encoded": cached["items_encoded"],
                            "reencode_encode_calls": naive["encode_calls"],
                            "reencode_items_encoded": naive["items_encoded"],
                            "cached_s": round(cached["seconds"], 3),
                            "reencode_s": round(naive["seconds"], 3),
                            "reencode_over_cached_time": round(naive["seconds"] / cached["seconds"], 2),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
