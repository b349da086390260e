"""Runs SGLang's own encoder-disaggregation receiver (sglang 0.5.23, the environment of scripts/sglang_env.sh)
against the pool's SGLang front; tests/test_sglang.py writes the plan and checks what this reports.

    .venv-sglang/bin/python tests/sglang_scenarios.py PLAN.json OUT_DIR

The plan: {"encoder_urls": [URL...], "tp": N, "requests": [{"rid": ..., "images": [DATA_URL...],
"videos": [DATA_URL...], "content_hashes": [..] | null}], "raw": {"url": URL, "item": DATA_URL} | null}.
For each request, as SGLang's language server would: its tokenizer's dispatch (`MMReceiverHTTP.encode`, the
items assigned to the encoders by SGLang's own `_assign_items_by_modality`), and `tp` scheduler ranks, each a
`WaitingZmqRequest` (its receive-URL registration, its PULL socket, SGLang's unpickler and part
assembly), polled until each rank succeeds or fails. The step that needs a model's processor
(`get_validated_mm_data`) gets what the receiver assembled and keeps it: it is what this checks. "raw": one
JSON /encode + /scheduler_receive_url exchange by hand, its ZMQ message read with SGLang's `safe_pickle_loads`.
OUT_DIR/result.json gets each request's outcome; OUT_DIR/<rid>.safetensors the tensors each rank assembled.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import types
from pathlib import Path

import torch
import zmq
from safetensors.torch import save_file


class KeepAssembled:
    """Stands in for the model's multimodal processor, which needs the language model's checkpoint and GPU
    runtime: keeps what SGLang's receiver hands to it (per-modality tensors, the grids)."""

    prefer_tokenized_input = False

    def __init__(self):
        self.embeddings, self.meta = None, None

    def get_validated_mm_data(self, prompt, embeddings, **meta):
        self.embeddings, self.meta = embeddings, meta
        return types.SimpleNamespace(input_ids=[0])


def run_request(request: dict, encoder_urls: list[str], tp: int, out_dir: Path) -> dict:
    from sglang.srt.disaggregation.encoder.receiver import (MMReceiverHTTP, WaitingMMRequestStatus,
                                                            WaitingZmqRequest, _ReceiveRegistrationRunner)
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.multimodal.modality import Modality

    obj = GenerateReqInput(text="describe", image_data=request["images"] or None,
                           video_data=request["videos"] or None, rid=request["rid"])
    if request.get("content_hashes"):
        obj.mm_content_hashes = request["content_hashes"]
    dispatcher = object.__new__(MMReceiverHTTP)  # the tokenizer side, without a server around it
    dispatcher.host, dispatcher.encode_urls = "127.0.0.1", list(encoder_urls)
    mm_data = dispatcher._extract_url_data(obj)
    assigned = dispatcher._assign_items_by_modality(mm_data, len(encoder_urls))
    runner = _ReceiveRegistrationRunner("registration")
    ranks, processors = [], []
    for _ in range(tp):
        processors.append(KeepAssembled())
        recv_req = types.SimpleNamespace(rid=request["rid"], num_items_assigned=assigned, input_text="describe",
                                         input_ids=None, mm_inputs=None)
        rank = WaitingZmqRequest(request["rid"], recv_req, processors[-1], list(encoder_urls), "internvl",
                                 "127.0.0.1", tp, zmq_context=zmq.Context(), registration_runner=runner)
        rank.send_encode_request()
        ranks.append(rank)
    dispatch = asyncio.run(dispatcher.encode(request["rid"], mm_data, None, "encode", assigned, encoder_urls))
    deadline = time.monotonic() + 60
    while any(r.status == WaitingMMRequestStatus.PENDING for r in ranks) and time.monotonic() < deadline:
        for rank in ranks:
            rank._try_recv_mm_data()
        time.sleep(0.01)
    outcome = {"rid": request["rid"], "assigned": {m.name: n for m, n in assigned.items()},
               "dispatch_error": getattr(dispatch, "error_msg", None), "ranks": []}
    for i, (rank, processor) in enumerate(zip(ranks, processors)):
        outcome["ranks"].append({"status": rank.status.name, "error_msg": rank.error_msg,
                                 "error_code": rank.error_code})
        if processor.embeddings is not None:
            save_file({f"{m.name}": t.contiguous() for m, t in processor.embeddings.items()},
                      out_dir / f"{request['rid']}.rank{i}.safetensors")
            grids = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in processor.meta.items()
                     if k in ("img_grid_thw", "video_grid_thw") and v is not None}
            outcome["ranks"][-1]["grids"] = grids
        rank.close_recv_socket()
    assert Modality  # imported to check the enum module the frames name exists in this sglang
    return outcome


def run_raw(raw: dict, out_dir: Path) -> dict:
    """One exchange by hand: a PULL socket of our own, /scheduler_receive_url, /encode, the frames read with
    SGLang's own unpickler."""
    import urllib.request

    from sglang.srt.utils.common import safe_pickle_loads

    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")

    def post(path: str, body: dict) -> tuple[int, object]:
        request = urllib.request.Request(f"{raw['url']}{path}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    registered = post("/scheduler_receive_url", {"req_id": "raw_local_part_0", "receive_count": 1,
                                                 "receive_url": f"127.0.0.1:{port}", "modality": "IMAGE"})
    encoded = post("/encode", {"req_id": "raw_local_part_0", "mm_items": [raw["item"]], "num_parts": 1,
                               "part_idx": 0, "modality": "IMAGE", "prefill_host": "127.0.0.1",
                               "embedding_port": None})
    frames = pull.recv_multipart() if pull.poll(10_000) else []
    out = {"registered": registered, "encoded": encoded, "frames": len(frames)}
    if frames:
        obj = safe_pickle_loads(frames[0])
        rows = torch.frombuffer(bytearray(frames[1]), dtype=obj.dtype).reshape(obj.shape)
        save_file({"rows": rows}, out_dir / "raw.safetensors")
        out.update(cls=f"{type(obj).__module__}.{type(obj).__qualname__}", shape=list(obj.shape),
                   dtype=str(obj.dtype), grid=obj.grid_dim, req_id=obj.req_id)
    pull.close(linger=0)
    context.term()
    return out


def main() -> None:
    plan, out_dir = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"requests": [run_request(r, plan["encoder_urls"], plan.get("tp", 1), out_dir)
                           for r in plan.get("requests", [])]}
    if plan.get("raw"):
        result["raw"] = run_raw(plan["raw"], out_dir)
    (out_dir / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
