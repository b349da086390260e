"""Command line: `serve` a checkpoint, `encode` files against a server or pool, `bench` a deployment,
`health`-check it, `inspect` or `fingerprint` a checkpoint directory (the whole pipeline on an embedded
default: `encoder-service-demo`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

from encoder_service.config import EngineConfig


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="local dir with config.json + *.safetensors (default: embedded tiny model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--preprocess-device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where images are resized and tiled: cuda (workers only decode; same pixels, a fraction "
                        "of the CPU), cpu, or auto (cuda when the engine runs on CUDA and the model resamples "
                        "with Pillow's bicubic)")
    p.add_argument("--max-tokens-per-batch", type=int, default=EngineConfig.max_tokens_per_batch)
    p.add_argument("--max-tokens-per-request", type=int, default=EngineConfig.max_tokens_per_request)
    p.add_argument("--max-items-per-request", type=int, default=EngineConfig.max_items_per_request)
    p.add_argument("--video-pruning-rate", type=float, default=None,
                   help="EVS rate q in [0, 1) for videos whose request sets none (default: 0, keep every token)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        checkpoint=args.checkpoint,
        device=args.device,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        preprocess_device=args.preprocess_device,
        max_tokens_per_batch=args.max_tokens_per_batch,
        max_tokens_per_request=args.max_tokens_per_request,
        max_items_per_request=args.max_items_per_request,
        video_pruning_rate=args.video_pruning_rate,
    )


def _add_address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="127.0.0.1:50051",
                   help="host:port of a standalone server or of a Ray Serve pool's gRPC proxy (TLS and token "
                   "from $ENCODER_SERVICE_CA, _CLIENT_CERT, _CLIENT_KEY, _TOKEN)")
    p.add_argument("--application", default="", help="through a Serve proxy serving several applications: "
                   "the one to reach (gRPC metadata `application`)")


def fail(message: str, code: int) -> int:
    """One line on stderr, a non-zero exit code: what a script or an operator can act on."""
    print(f"encoder-service: error: {message}", file=sys.stderr)
    return code


def cmd_sglang_encoder(args: argparse.Namespace) -> int:
    from encoder_service.integrations.sglang.front import main as front

    front(args.front_args)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from encoder_service.serving.api.security import TLSConfig
    from encoder_service.serving.api.server import ServerConfig, serve_forever
    from encoder_service.serving.host.pipeline import PipelineConfig
    from encoder_service.transfer.nixl import NixlSettings

    if bool(args.tls_cert) != bool(args.tls_key):
        return fail("--tls-cert and --tls-key go together", 2)
    pipeline = PipelineConfig(preprocess_workers=args.preprocess_workers, arena_mb=args.arena_mb,
                              output_arena_mb=args.output_arena_mb, cache_mb=args.cache_mb,
                              heap_large_buffers=not args.mmap_large_buffers)
    tls = TLSConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    cfg = ServerConfig(host=args.host, port=args.port, engine=engine_config(args), pipeline=pipeline, tls=tls,
                       auth_token_file=args.auth_token_file, insecure=args.insecure,
                       max_request_bytes=args.max_request_mb << 20, drain_grace_s=args.drain_grace_s,
                       metrics_port=args.metrics_port, cache_per_token=not args.shared_cache,
                       stream_chunk_bytes=int(args.stream_chunk_mb * (1 << 20)),
                       nixl=NixlSettings(enabled=args.nixl, ucx_transports=args.ucx_transports,
                                         ucx_devices=args.ucx_devices, lease_s=args.lease_s,
                                         lease_mb_per_tenant=args.lease_mb_per_tenant,
                                         lease_mb_total=args.lease_mb_total))
    try:
        asyncio.run(serve_forever(cfg))
    except KeyboardInterrupt:
        pass
    except (ValueError, RuntimeError, OSError) as e:  # bad configuration, unusable backend, port taken
        return fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 2)
    return 0


def _wait_ready(client, timeout: float) -> None:
    if client.wait_ready(timeout=timeout) != "health":
        print(f"encoder-service: note: {client.address} does not answer the gRPC health service; "
              "readiness checked with GetModelInfo", file=sys.stderr)


def cmd_encode(args: argparse.Namespace) -> int:
    import grpc

    from encoder_service.client.endpoint import EncoderClient
    from encoder_service.client.retry import RetryPolicy
    from encoder_service.contract.errors import InvalidInput
    from encoder_service.contract.media import VideoSampling
    from encoder_service.contract.wire.status import item_from_status
    from encoder_service.tools.encode_files import Progress, describe, media_from_files, save

    try:
        sampling = None
        if args.num_frames or args.fps or args.max_frames:
            sampling = VideoSampling(args.num_frames or 0, args.fps or 0.0, args.max_frames or 0)
        items = media_from_files(args.files, sampling, args.pruning_rate)
    except OSError as e:
        return fail(f"cannot read {e.filename}: {e.strerror}", 2)
    except InvalidInput as e:
        return fail(str(e), 2)
    if args.out and not args.out.endswith((".safetensors", ".npy")):
        return fail(f"--out must end in .safetensors or .npy: {args.out}", 2)
    try:
        with EncoderClient(args.address, timeout=args.timeout, probe=args.probe, application=args.application,
                           retry=RetryPolicy(attempt_timeout_s=args.timeout), transfer=args.transfer) as client:
            _wait_ready(client, args.connect_timeout)
            info = client.model_info()
            with Progress(describe(items)) as progress:
                result = client.encode(items)
    except grpc.FutureTimeoutError:
        return fail(f"no encoder server answering at {args.address} (waited {args.connect_timeout:g} s)", 3)
    except grpc.RpcError as e:
        item = item_from_status(e)
        where = f" (file {args.files[item[0]]})" if item is not None else ""
        return fail(f"server refused the request{where}: {e.code().name}: {e.details()}", 4)
    except (ValueError, RuntimeError) as e:  # TLS files, a server that is not serving
        return fail(str(e), 3)
    elapsed = time.perf_counter() - progress.started
    print(f"model {info.model_name}: hidden={info.hidden_size} tokens/tile={info.tiling.tokens_per_tile}")
    print(f"embeddings {tuple(result.embeddings.shape)} {result.embeddings.dtype} in {elapsed:.2f} s")
    for item in result.items:
        frames = f" frames={len(item.tokens_per_frame)}" if item.tokens_per_frame else ""
        cached = " (cached)" if item.cache_hit else ""
        print(f"  {item.item_id}: tiles={item.num_tiles}{frames} tokens={item.token_count} offset={item.offset}{cached}")
    if args.out:
        try:
            written = save(result, args.out, info.model_name)
        except OSError as e:
            return fail(f"cannot write {args.out}: {e.strerror}", 2)
        print("saved " + ", ".join(map(str, written)))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Load on a running deployment: a live progress line, then a table (and JSON with --json)."""
    import grpc

    from encoder_service.client.endpoint import EncoderClient
    from encoder_service.client.retry import RetryPolicy
    from encoder_service.tools.loadgen import LoadConfig, run, table

    cfg = LoadConfig(args.address, args.duration, args.concurrency, args.rate, args.images_per_request,
                     list(args.files), args.repeat, args.timeout)
    try:
        with EncoderClient(args.address, timeout=args.timeout, application=args.application,
                           retry=RetryPolicy(attempt_timeout_s=args.timeout)) as client:
            _wait_ready(client, args.connect_timeout)
            report = run(cfg, client)
    except grpc.FutureTimeoutError:
        return fail(f"no encoder server answering at {args.address} (waited {args.connect_timeout:g} s)", 3)
    except OSError as e:
        return fail(f"cannot read {e.filename}: {e.strerror}", 2)
    except (ValueError, RuntimeError) as e:
        return fail(str(e), 3)
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["requests"] else 4


def cmd_health(args: argparse.Namespace) -> int:
    """The endpoint's standard gRPC health check, for container health checks and scripts: exit 0 when
    SERVING, 1 when it answers anything else or nothing."""
    import grpc

    from encoder_service.client.endpoint import EncoderClient

    try:
        with EncoderClient(args.address, application=args.application) as client:
            status = client.health(timeout=args.timeout)
    except grpc.RpcError as e:
        status = f"{e.code().name}: {e.details()}"
    except (ValueError, RuntimeError) as e:  # TLS files
        return fail(str(e), 3)
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    """What a checkpoint directory holds and how it would be served; exit 2 with the reason if it cannot be."""
    from encoder_service.models.checkpoint import inspect_checkpoint

    try:
        info = inspect_checkpoint(args.checkpoint)
    except (OSError, ValueError, KeyError) as e:
        print(f"cannot serve {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    v, proj = info["vision"], info["projector"]
    print(f"{info['path']}: {info['family']} (model_type {info['model_type']}), {info['name']}")
    print(f"  vision: ViT {v['layers']} layers x {v['hidden']} wide, {v['heads']} heads of {v['head_dim']}, "
          f"MLP {v['mlp']}, patch {v['patch']}, {v['prefix_tokens']} prefix tokens, "
          f"position table {v['position_table']}, final norm {'yes' if v['final_norm'] else 'no'}")
    if proj:
        print(f"  projector: {proj['kind']}, pixel shuffle {proj['pixel_shuffle']}, hidden {proj['hidden']}"
              + (", vision LayerNorm before the shuffle (MTP checkpoint)" if proj["vision_norm"] else ""))
    print(f"  output: {info['output_size']}-wide embeddings")
    t = info["tiling"]
    frames = "" if info["video_frames"] else "video frames"
    users = ", ".join(u for u in (frames, "images" if not info["dynamic_resolution"] else "") if u) or "unused"
    print(f"  tiling ({users}): {t['tile_size']} px tiles, "
          f"{t['tiles']} per image, thumbnail {'yes' if t['thumbnail'] else 'no'}, {t['tokens_per_tile']} tokens per tile")
    if info["dynamic_resolution"]:
        d = info["dynamic_resolution"]
        print(f"  dynamic resolution (images): {d['patches']} patches per image, "
              f"at most {d['max_tokens_per_image']} tokens")
    if info["video_frames"]:
        f = info["video_frames"]
        print(f"  video frames: resized to about {f['target_num_patches']} patches"
              f"{', aspect ratio kept' if f['maintain_aspect_ratio'] else ', square'}")
    print(f"  parameters: {info['parameters']:,} read from the checkpoint ({', '.join(info['checkpoint_dtypes'])})")
    if info["tensor_families"]:
        print("  tensor families:")
    for family, what in (info["tensor_families"] or {}).items():
        print(f"    {family}: {what}")
    return 0


def cmd_fingerprint(args: argparse.Namespace) -> int:
    """The fingerprint a checkpoint directory is served with (what a consumer compares with GetModelInfo's)."""
    from encoder_service.fingerprint import of_checkpoint
    from encoder_service.models.checkpoint import tiny_checkpoint_dir

    try:
        fingerprint = of_checkpoint(args.checkpoint or tiny_checkpoint_dir(), args.dtype)
    except (OSError, ValueError, KeyError) as e:
        return fail(f"cannot fingerprint {args.checkpoint}: {e}", 2)
    print(json.dumps(fingerprint.to_dict(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="encoder-service", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run a standalone gRPC encoder server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--preprocess-workers", type=int, default=0, help="decode/tiling processes (0: half the CPUs, 1..8)")
    p.add_argument("--arena-mb", type=int, default=512, help="shared memory for tiles waiting for the device")
    p.add_argument("--output-arena-mb", type=int, default=1024,
                   help="shared memory for responses until they are sent (bounds response bytes in flight)")
    p.add_argument("--cache-mb", type=int, default=None,
                   help="embedding cache (rows of encoded items by content, LRU); 0: off; default: 1/16 of RAM, <= 4096")
    p.add_argument("--shared-cache", action="store_true",
                   help="one cache for every bearer token (default: entries per token, so tenants cannot probe "
                        "each other's images)")
    p.add_argument("--max-request-mb", type=int, default=64, help="largest request accepted")
    p.add_argument("--stream-chunk-mb", type=float, default=16.0,
                   help="EncodeStream: rows per message at most (a large item streams as several messages)")
    p.add_argument("--drain-grace-s", type=float, default=30.0, help="on SIGTERM, time for calls in flight")
    p.add_argument("--mmap-large-buffers", action="store_true",
                   help="leave glibc's malloc as it is: blocks above 32 MiB freshly mapped (slower answers above "
                        "32 MiB), freed memory returned to the OS at once")
    p.add_argument("--tls-cert", help="PEM certificate chain file (TLS on)")
    p.add_argument("--tls-key", help="PEM private key file")
    p.add_argument("--tls-client-ca", help="PEM CA file: require client certificates signed by it (mTLS)")
    p.add_argument("--auth-token-file", help="file holding the bearer token clients must send "
                   "(or $ENCODER_SERVICE_TOKEN; never on the command line)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without TLS")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics on this port (off by default)")
    p.add_argument("--nixl", action="store_true", help="hand rows out by reference too (NIXL; README: trust model)")
    p.add_argument("--ucx-transports", default="", help="UCX_TLS for NIXL (same node: cma,tcp,self)")
    p.add_argument("--ucx-devices", default="", help="UCX_NET_DEVICES: the interface NIXL consumers are on")
    p.add_argument("--lease-s", type=float, default=30.0, help="how long rows handed out by reference are held")
    p.add_argument("--lease-mb-per-tenant", type=int, default=1024,
                   help="rows one tenant may hold under lease; beyond, answers carry their rows")
    p.add_argument("--lease-mb-total", type=int, default=4096,
                   help="rows all tenants together may hold under lease; beyond, answers carry their rows")
    _add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("encode", help="encode image and video files against a running server or pool "
                       "(TLS/token from $ENCODER_SERVICE_CA, _CLIENT_CERT, _CLIENT_KEY, _TOKEN)")
    p.add_argument("files", nargs="+", help="images (JPEG/PNG/WebP) and videos (.mp4 .webm .mkv .mov .avi)")
    _add_address_arg(p)
    p.add_argument("--num-frames", type=int, default=None, help="videos: at most this many frames, spread evenly over the clip (vLLM's rule)")
    p.add_argument("--fps", type=float, default=None, help="videos: at most duration x fps frames, spread evenly (vLLM's rule)")
    p.add_argument("--max-frames", type=int, default=None, help="videos: at most this many frames")
    p.add_argument("--pruning-rate", type=float, default=None, help="videos: EVS rate q in [0, 1)")
    p.add_argument("--out", default=None, help="save the tensor + metadata: PATH.safetensors, or PATH.npy (+ PATH.json)")
    p.add_argument("--probe", action="store_true", help="send digests first, the files only if the server lacks them")
    p.add_argument("--transfer", choices=["bytes", "nixl"], default="bytes",
                   help="nixl: read the rows from the server's memory with NIXL (falls back to bytes)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--connect-timeout", type=float, default=5.0, help="give up if no server answers by then")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("bench", help="load a running deployment: closed loop or fixed rate, built-in images or yours")
    p.add_argument("files", nargs="*", help="images to send (default: new random JPEGs of a photo-like mix)")
    _add_address_arg(p)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    p.add_argument("--concurrency", type=int, default=8, help="closed loop: requests in flight")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: requests per second (instead of --concurrency)")
    p.add_argument("--images-per-request", type=int, default=2)
    p.add_argument("--repeat", action="store_true", help="built-in mix: cycle 16 fixed images (exercises the cache)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--connect-timeout", type=float, default=5.0)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("health", help="the endpoint's gRPC health check: exit 0 when SERVING (container probes)")
    _add_address_arg(p)
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("inspect", help="describe a checkpoint directory (headers only) or say why it cannot be served")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("fingerprint", help="what a checkpoint directory's rows are produced by (weights, "
                       "preprocessing, width, dtype): compare with a pool's GetModelInfo")
    p.add_argument("--checkpoint", help="local dir (default: the embedded tiny model)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="the dtype the rows are served in (bfloat16 on GPUs, float32 on CPUs)")
    p.set_defaults(func=cmd_fingerprint)

    p = sub.add_parser("sglang-encoder", add_help=False,
                       help="serve the pool to SGLang's language servers as their encoder (EPD; the `sglang` extra; "
                            "`encoder-service sglang-encoder --help` for its options)")
    p.set_defaults(func=cmd_sglang_encoder)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sglang-encoder"]:  # its options are the front's own
        return cmd_sglang_encoder(argparse.Namespace(front_args=argv[1:]))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
