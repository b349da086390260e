"""Autoscaling the Serve pool on the encoder's real load.

Requests differ a hundredfold in work (a thumbnail is 1 tile, a 64-frame video 64), so Serve's
default signal, requests in flight per replica, says little about how busy a replica is. Each
replica reports the ViT tokens it has admitted and not finished (`pending_vit_tokens`: being
decoded, queued for the device, on it; `EncoderDeployment.record_autoscaling_stats`), and this
policy sizes the pool so that each replica holds about `target_pending_tokens` of them. Requests
waiting in Serve's routers (every replica at `max_ongoing_requests`) are invisible to the replicas,
so the pool also grows when those alone would need more replicas. A running replica that has not
reported is not an idle one (it may be too busy to answer): the pool never shrinks on its silence.
Serve applies the deployment's min/max replicas, delays and scaling factors to what the policy asks for.

    autoscaling_config:
      policy:
        policy_function: encoder_service.serving.api.serve.autoscaling:EncoderLoadPolicy
        policy_kwargs: {target_pending_tokens: 65536}
"""

from __future__ import annotations

from typing import Any

POLICY_FUNCTION = "encoder_service.serving.api.serve.autoscaling:EncoderLoadPolicy"
PENDING_TOKENS = "pending_vit_tokens"


def desired_replicas(pending_tokens: float, target_pending_tokens: float, requests: float,
                     max_ongoing_requests: float) -> float:
    """Replicas for this much work: the ViT tokens in the replicas at the target per replica, or the
    requests (also those queued before any replica) at each replica's cap, whichever needs more."""
    return max(pending_tokens / target_pending_tokens, requests / max(1.0, max_ongoing_requests))


class EncoderLoadPolicy:
    """A Serve autoscaling policy (a class: Serve instantiates it once with `policy_kwargs`)."""

    def __init__(self, target_pending_tokens: int = 65536, max_ongoing_requests: int = 32):
        if target_pending_tokens <= 0:
            raise ValueError("target_pending_tokens must be positive")
        self.target_pending_tokens = target_pending_tokens
        self.max_ongoing_requests = max_ongoing_requests

    def __call__(self, ctx) -> tuple[float, dict[str, Any]]:
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, {}
        per_replica = (ctx.aggregated_metrics or {}).get(PENDING_TOKENS, {})
        pending = float(sum(per_replica.values()))
        desired = desired_replicas(pending, self.target_pending_tokens, float(ctx.total_num_requests),
                                   self.max_ongoing_requests)
        silent = sum(1 for replica in ctx.running_replicas if replica not in per_replica)
        if silent:
            desired = max(desired, float(ctx.target_num_replicas))
        return desired, {"pending_vit_tokens": pending, "silent_replicas": silent}
