"""msgpack codec for the LLM worker actor's API: plain maps of bytes/str/int, never pickle."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np

from encoder_service.contract.media import MediaDigest, MediaInput, Modality, Source, VideoSampling
from llm_worker.engine import GenerationOutput, GenerationRequest


def _pack_media(m: MediaInput) -> dict:
    out = {"modality": m.modality.value, "item_id": m.item_id, "content_hash": m.content_hash}
    source = m.source
    if source == Source.RAW_PIXELS:
        out["pixels"] = {"shape": list(m.data.shape), "data": np.ascontiguousarray(m.data, np.uint8).tobytes()}
    elif source == Source.ENCODED_FRAMES:
        out["frames"] = list(m.data)
    elif source == Source.DIGEST:
        out["digest"] = m.data.value
    else:
        out["bytes"] = bytes(m.data)
    if m.pruning_rate is not None:
        out["pruning_rate"] = float(m.pruning_rate)
    if m.sampling is not None:
        out["sampling"] = dataclasses.asdict(m.sampling)
    return out


def _unpack_media(d: dict) -> MediaInput:
    if "pixels" in d:
        data = np.frombuffer(d["pixels"]["data"], np.uint8).reshape(d["pixels"]["shape"])
    elif "frames" in d:
        data = list(d["frames"])
    elif "digest" in d:
        data = MediaDigest(d["digest"])
    else:
        data = d["bytes"]
    sampling = VideoSampling(**d["sampling"]) if "sampling" in d else None
    return MediaInput(Modality(d["modality"]), data, item_id=d.get("item_id", ""), content_hash=d.get("content_hash", ""),
                      sampling=sampling, pruning_rate=d.get("pruning_rate"))


def pack_requests(requests: list[GenerationRequest]) -> bytes:
    return msgpack.packb(
        [
            {"request_id": r.request_id, "prompt": r.prompt, "max_new_tokens": r.max_new_tokens,
             "media": [_pack_media(m) for m in r.media]}
            for r in requests
        ]
    )


def unpack_requests(payload: bytes) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            prompt=d["prompt"],
            media=[_unpack_media(m) for m in d["media"]],
            max_new_tokens=d["max_new_tokens"],
            request_id=d["request_id"],
        )
        for d in msgpack.unpackb(payload)
    ]


def pack_outputs(outputs: list[GenerationOutput]) -> bytes:
    return msgpack.packb([dataclasses.asdict(o) for o in outputs])


def unpack_outputs(payload: bytes) -> list[GenerationOutput]:
    return [GenerationOutput(**d) for d in msgpack.unpackb(payload)]
