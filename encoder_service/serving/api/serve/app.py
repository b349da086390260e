"""Building the pool's Serve application from a Serve config (`import_path:
encoder_service.serving.api.serve.app:build_app`), and what the cluster can place."""

from __future__ import annotations

from typing import Any

import ray
from ray import serve

from encoder_service.config import EngineConfig
from encoder_service.contract.settings import check_keys, from_mapping
from encoder_service.serving.api.edge import EdgeLimits
from encoder_service.serving.api.serve.deployment import EncoderDeployment
from encoder_service.serving.host.pipeline import PipelineConfig
from encoder_service.transfer.nixl import NixlSettings


APP_ARGS = frozenset({"engine", "pipeline", "limits", "gpus_per_replica", "cpus_per_replica", "resources_per_replica",
                      "cache_per_token", "auth_token_file", "require_auth", "trust_cluster", "nixl",
                      "deployment_options"})


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder (`import_path: encoder_service.serving.api.serve.app:build_app` in a Serve config).

    args: `engine` (EngineConfig fields), `pipeline` (PipelineConfig fields), `limits` (EdgeLimits fields),
    `gpus_per_replica` (`gpus_per_replica()`), `cpus_per_replica`, `resources_per_replica` (custom Ray
    resources, e.g. to keep replicas on labelled nodes), `cache_per_token`, `auth_token_file` (the accepted
    bearer tokens; else the replicas' $ENCODER_SERVICE_TOKEN_FILE / $ENCODER_SERVICE_TOKEN), `require_auth`
    (refuse to start without tokens), `trust_cluster` (handle calls may name no tenant), `nixl` (NixlSettings
    fields: rows by reference, off by default). An unknown key, here or in a section, is refused with its
    name before anything is deployed.
    """
    check_keys(args, APP_ARGS, "the encoder application's args")
    sections = {"engine": EngineConfig, "pipeline": PipelineConfig, "limits": EdgeLimits, "nixl": NixlSettings}
    for name, cls in sections.items():
        from_mapping(cls, args.get(name), f"args.{name}")
    actor_options = {"num_cpus": args.get("cpus_per_replica", 1), "num_gpus": gpus_per_replica(args),
                     "resources": args.get("resources_per_replica", {})}
    deployment = EncoderDeployment.options(ray_actor_options=actor_options, **args.get("deployment_options", {}))
    return deployment.bind(args.get("engine", {}), args.get("pipeline", {}), args.get("cache_per_token", True),
                           args.get("limits", {}), args.get("auth_token_file"), args.get("require_auth", False),
                           args.get("trust_cluster", False), args.get("nixl"))


def gpus_per_replica(args: dict[str, Any]) -> float:
    """`gpus_per_replica` of the app's args: a number (a fraction shares a GPU between replicas), or "auto":
    one GPU per replica when the cluster has GPUs, else CPU replicas."""
    gpus = args.get("gpus_per_replica", "auto")
    if gpus == "auto":
        return 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0
    return float(gpus)


def unplaceable_replicas(max_replicas: int | None, gpus_per_replica: float, cluster_gpus: float) -> str | None:
    """Why some of the pool's replicas cannot be placed on the cluster as it is now, or None.

    Serve leaves a replica it cannot place PENDING without a word; the pool says so once instead."""
    if not max_replicas or gpus_per_replica <= 0 or max_replicas * gpus_per_replica <= cluster_gpus + 1e-9:
        return None
    placeable = int(cluster_gpus / gpus_per_replica + 1e-9)
    return (f"the encoder pool may grow to {max_replicas} replicas of {gpus_per_replica:g} GPU each "
            f"({max_replicas * gpus_per_replica:g} GPUs) but the cluster has {cluster_gpus:g} GPU(s): at most "
            f"{placeable} replica(s) can run, the others stay pending until GPU nodes join (a KubeRay autoscaler "
            f"adds them). Lower max_replicas, or share GPUs (gpus_per_replica: 0.5); see deploy/README.md")
