"""deploy/rayservice.yaml, kept honest: its Serve config is deploy/serve_config.yaml with the Kubernetes
differences below and nothing else, and its cluster can hold what that config asks for.

One source of truth: `render_serve_config()` makes the manifest's `serveConfigV2` from serve_config.yaml
and `KUBERNETES`; `python -m encoder_service.tools.kuberay` rewrites the block in the manifest (or, with
`--check`, says what is wrong with it); the test suite runs the same check and validates the manifest
against KubeRay's RayService schema.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SERVE_CONFIG = DEPLOY / "serve_config.yaml"
MANIFEST = DEPLOY / "rayservice.yaml"
APP = "applications.0"
TOKENS_SECRET = "encoder-service-tokens"  # kubectl create secret generic encoder-service-tokens --from-file=tokens=...
TOKENS_DIR = "/var/run/secrets/encoder-service"
DEPLOYMENT = f"{APP}.deployments.0"

# What differs on Kubernetes, and why. Dotted paths into the Serve config (list items by index).
KUBERNETES: dict[str, tuple[Any, str]] = {
    "http_options.host": ("0.0.0.0", "proxies listen on the pod's address, not loopback"),
    f"{APP}.args.gpus_per_replica": (1, "one whole GPU per replica (the worker group has one GPU per pod)"),
    f"{APP}.args.cpus_per_replica": (8, "decode/tiling workers (the replica's CPUs minus one) keep a GPU fed"),
    f"{APP}.args.engine.checkpoint": ("/models/encoder", "the checkpoint volume, mounted read-only"),
    f"{APP}.args.auth_token_file": (f"{TOKENS_DIR}/tokens", "the bearer tokens, from the Kubernetes Secret "
                                    f"{TOKENS_SECRET} mounted read-only"),
    f"{APP}.args.engine.device": ("cuda", "GPU workers only"),
    f"{APP}.args.engine.dtype": ("bfloat16", "what the GPU replicas run"),
    f"{APP}.args.pipeline.arena_mb": (1024, "room for long videos' tiles on nodes with large memory"),
    f"{APP}.args.pipeline.cache_mb": (8192, "GPU pods have 64 GiB: a larger embedding cache"),
    f"{DEPLOYMENT}.autoscaling_config.max_replicas": (8, "the worker group grows to 8 GPU pods"),
    f"{DEPLOYMENT}.autoscaling_config.upscale_delay_s": (10, "a new replica needs a new pod (minutes): don't flap"),
    f"{DEPLOYMENT}.autoscaling_config.downscale_delay_s": (120, "keep pods through short lulls"),
}


def _walk(config: Any, path: str) -> tuple[Any, str | int]:
    """The container holding `path`'s last key, and that key."""
    *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
    for key in parents:
        config = config[key]
    return config, last


def lookup(config: Any, path: str) -> Any:
    parent, key = _walk(config, path)
    return parent[key]


def render_serve_config(serve_config: dict | None = None) -> dict:
    """The Serve config the Kubernetes pool runs: serve_config.yaml with `KUBERNETES` applied."""
    config = copy.deepcopy(serve_config if serve_config is not None else yaml.safe_load(SERVE_CONFIG.read_text()))
    for path, (value, _) in KUBERNETES.items():
        parent, key = _walk(config, path)
        if not isinstance(parent, list) and key not in parent:
            raise KeyError(f"{path} is not in {SERVE_CONFIG.name}: update KUBERNETES with the config")
        parent[key] = value
    return config


def serve_config_block(config: dict) -> str:
    """`serveConfigV2`'s YAML, as the manifest holds it."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=120)


def _gpus(container: dict) -> float:
    return float(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _cpus(container: dict) -> float:
    cpu = str(container.get("resources", {}).get("limits", {}).get("cpu", "0"))
    return float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)


def check_manifest(manifest: dict, serve_config: dict | None = None) -> list[str]:
    """What is wrong with a RayService manifest for this pool (its schema aside: see tests/test_deploy.py)."""
    problems = []
    spec = manifest["spec"]
    served = yaml.safe_load(spec["serveConfigV2"])
    if served != render_serve_config(serve_config):
        problems.append("serveConfigV2 differs from deploy/serve_config.yaml + KUBERNETES: regenerate it with "
                        "`python -m encoder_service.tools.kuberay`")
    app = served["applications"][0]
    scaling = app["deployments"][0].get("autoscaling_config") or {}
    max_replicas = scaling.get("max_replicas", app["deployments"][0].get("num_replicas", 1))
    gpus_per_replica, cpus_per_replica = app["args"]["gpus_per_replica"], app["args"]["cpus_per_replica"]
    grpc_port = served["grpc_options"]["port"]

    cluster = spec["rayClusterConfig"]
    if not cluster.get("enableInTreeAutoscaling"):
        problems.append("rayClusterConfig.enableInTreeAutoscaling is off: the worker group never grows past its "
                        "replicas, so Serve's extra replicas stay pending")
    options = cluster.get("autoscalerOptions", {})
    for field in ("idleTimeoutSeconds", "upscalingMode"):
        if field not in options:
            problems.append(f"rayClusterConfig.autoscalerOptions.{field} is not set")

    head = cluster["headGroupSpec"]
    head_container = head["template"]["spec"]["containers"][0]
    if str(head.get("rayStartParams", {}).get("num-cpus")) != "0":
        problems.append("the head should schedule no replicas (rayStartParams num-cpus: \"0\")")
    ports = {p.get("name"): p["containerPort"] for p in head_container.get("ports", [])}
    if ports.get("serve-grpc") != grpc_port:
        problems.append(f"the head container needs port {grpc_port} named serve-grpc (KubeRay's serve Service "
                        f"exposes ports named serve / serve-*)")

    groups = [g for g in cluster.get("workerGroupSpecs", []) if _gpus(g["template"]["spec"]["containers"][0]) > 0]
    if gpus_per_replica and not groups:
        problems.append("no worker group has GPUs, the replicas need them")
    capacity = 0.0
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        gpus = _gpus(container)
        replicas_per_pod = int(gpus / gpus_per_replica + 1e-9) if gpus_per_replica else 0
        capacity += group.get("maxReplicas", 0) * replicas_per_pod
        name = group["groupName"]
        if replicas_per_pod * cpus_per_replica > _cpus(container):
            problems.append(f"worker group {name}: {replicas_per_pod} replica(s) of {cpus_per_replica} CPUs per pod "
                            f"need more than the pod's {_cpus(container):g} CPUs")
        probe = container.get("readinessProbe", {}).get("grpc", {})
        if probe.get("port") != grpc_port:
            problems.append(f"worker group {name}: readinessProbe should be the gRPC health check on port {grpc_port}")
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        checkpoint = app["args"]["engine"].get("checkpoint") or ""
        holder = next((m for path, m in mounts.items() if checkpoint.startswith(path.rstrip("/") + "/")), None)
        if holder is None or not holder.get("readOnly"):
            problems.append(f"worker group {name}: the checkpoint {checkpoint} must be on a read-only volume mount")
        problems += _auth_problems(app["args"], name, container, group["template"]["spec"])
    if gpus_per_replica and capacity < max_replicas:
        problems.append(f"the GPU worker groups hold at most {capacity:g} replicas at maxReplicas, Serve may ask "
                        f"for {max_replicas}: raise maxReplicas (>= max_replicas x gpus_per_replica / GPUs per pod)")
    return problems


def _auth_problems(args: dict, group: str, container: dict, pod: dict) -> list[str]:
    """The replicas' tokens come from a Secret mounted read-only where `auth_token_file` points."""
    if not args.get("require_auth"):
        return [f"worker group {group}: the pool must require auth (args.require_auth: true)"]
    token_file = args.get("auth_token_file") or ""
    mount = next((m for m in container.get("volumeMounts", [])
                  if token_file.startswith(m["mountPath"].rstrip("/") + "/")), None)
    volume = next((v for v in pod.get("volumes", []) if mount is not None and v["name"] == mount["name"]), None)
    if mount is None or not mount.get("readOnly") or volume is None or "secret" not in volume:
        return [f"worker group {group}: auth_token_file {token_file!r} must be on a read-only mount of a Secret"]
    return []


def write_manifest(path: Path = MANIFEST) -> None:
    """Replace the manifest's `serveConfigV2: |` block with the rendered config (comments elsewhere kept)."""
    text = path.read_text()
    match = re.search(r"^(\s*)serveConfigV2: \|[^\n]*\n((?:\1  .*\n|\s*\n)+)", text, re.M)
    if match is None:
        raise ValueError(f"{path}: no `serveConfigV2: |` block")
    indent = match.group(1) + "  "
    block = "".join(f"{indent}{line}\n" if line else "\n" for line in serve_config_block(render_serve_config()).splitlines())
    path.write_text(text[: match.start(2)] + block + text[match.end(2):])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report what is wrong with the manifest (exit 1 if any)")
    p.add_argument("--manifest", type=Path, default=MANIFEST)
    args = p.parse_args()
    if not args.check:
        write_manifest(args.manifest)
    problems = check_manifest(yaml.safe_load(args.manifest.read_text()))
    for problem in problems:
        print(f"{args.manifest}: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
