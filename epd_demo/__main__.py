"""The main job on an embedded default: local Ray, the encoder pool on Serve (tiny model, CPU),
one LLM worker actor, a prompt with two images -> generated text + the encoder's metadata.

    encoder-service-demo [--config deploy/serve_config.yaml]

It uses the library as an application would: the pool (`encoder_service`), its client and an LLM worker
(`llm_worker`); it is no part of either."""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys

import numpy as np
from PIL import Image

from encoder_service.contract.media import MediaInput, Modality


def demo_images() -> list[MediaInput]:
    rng = np.random.default_rng(0)
    items = []
    for name, (w, h) in {"photo.png": (640, 480), "document.png": (300, 900)}.items():
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        items.append(MediaInput(Modality.IMAGE, buf.getvalue(), item_id=name))
    return items


def run_demo(args: argparse.Namespace) -> int:
    # Ray's token authentication, on purpose (Ray would turn it on by default and warn; production keeps it):
    # the local cluster requires the token Ray keeps in ~/.ray/auth_token (made on first use). Set before
    # Ray is first imported: the driver reads the mode then.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    from encoder_service.client.endpoint import EncoderClient
    from encoder_service.serving.api.serve.local import DEFAULT_CONFIG, deploy, free_port, load_serve_config, local_auth
    from llm_worker.actor import LLMWorkerActor
    from llm_worker.codec import pack_requests, unpack_outputs
    from llm_worker.engine import GenerationRequest

    for name in ("ray", "ray.serve"):  # what the demo did is printed below; Ray's progress lines are not
        logging.getLogger(name).setLevel(logging.WARNING)
    config = load_serve_config(args.config or DEFAULT_CONFIG)
    config["grpc_options"]["port"], config["http_options"]["port"] = free_port(), free_port()
    app = config["applications"][0]["name"]
    local_auth()  # the pool requires a bearer token (deploy/serve_config.yaml): a fresh one, in the environment
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        address = deploy(config)
        print(f"encoder pool '{app}' on Ray Serve, gRPC proxy at {address}")
        images = demo_images()
        with EncoderClient(address) as client:  # the token from the environment ($ENCODER_SERVICE_TOKEN)
            encoded = client.encode(images, metadata=(("application", app),))
        print(f"Encode: one tensor {tuple(encoded.embeddings.shape)} {encoded.embeddings.dtype}")
        for item in encoded.items:
            print(f"  {item.item_id}: {item.num_tiles} tiles, {item.token_count} tokens at rows "
                  f"[{item.offset}, {item.offset + item.token_count})")
        print(f"  served by replica {encoded.extras.get('replica')}, batch of {encoded.extras.get('batch_requests')}")

        # Inside the cluster the LLM worker reaches the pool through a Serve handle (Ray-native path), naming its
        # tenant (the pool requires one).
        pool = {"transport": "handle", "application": app, "tenant": "demo-llm-workers"}
        worker = LLMWorkerActor.options(num_cpus=1).remote(pool, {"chunk_size": 64})
        request = GenerationRequest("Describe <image> and compare it with <image>.", images, max_new_tokens=16)
        [output] = unpack_outputs(ray.get(worker.generate.remote(pack_requests([request])), timeout=300))
        stats = ray.get(worker.stats.remote())
        print(f"LLM worker (Serve handle, tensor via Ray's object store): prompt of {output.prompt_tokens} tokens "
              f"({output.media_tokens} media), {output.prefill_chunks} prefill chunks, {stats['encode_calls']} Encode call(s)")
        print(f"generated (tiny random LLM, so noise): {output.text!r}")
        return 0
    finally:
        # The local cluster goes as a whole: Serve's own shutdown would kill its controller under its own
        # pending graceful-shutdown call and log that as a failure.
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="encoder-service-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="Serve config (default: deploy/serve_config.yaml)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
