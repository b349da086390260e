"""Efficient Video Sampling (EVS): drop the video tokens that barely change from the previous frame.

Applied per video to the projector's output, frame-major, as vLLM (`multimodal/evs.py`) and
TensorRT-LLM (Nemotron Nano VL) do it, so that a prompt laid out by either stack matches:
- the budget: K = max(N, int(N * T * (1 - q))) for N tokens per frame, T frames, rate q;
- a token's score is 1 - cosine similarity with the token at the same position in the previous
  frame, computed in the embeddings' own dtype (bf16 ties matter); frame 0 scores 255;
- the K best scores of a stable descending sort over the flattened (frame, position) order are
  kept (ties go to the earlier frame, then position), in their original order.
Frame 0 is always whole; other frames may keep 0 tokens; T = 1 keeps everything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from encoder_service.contract.tokens import retained_token_count


def retention_mask(embeddings: torch.Tensor, q: float) -> torch.Tensor:
    """embeddings [T, N, D] -> bool [T, N]: which tokens to keep."""
    t, n, _ = embeddings.shape
    keep = retained_token_count(n, t, q)
    first = torch.full((1, n), 255, dtype=embeddings.dtype, device=embeddings.device)
    change = 1 - F.cosine_similarity(embeddings[1:], embeddings[:-1], dim=-1)
    scores = torch.cat([first, change]).flatten()
    order = torch.argsort(scores, descending=True, stable=True)
    mask = torch.zeros(t * n, dtype=torch.bool, device=embeddings.device)
    mask[order[:keep]] = True
    return mask.view(t, n)


def prune(rows: torch.Tensor, num_frames: int, q: float) -> tuple[torch.Tensor, list[int]]:
    """A video's rows [T*N, D] -> (kept rows [K, D] in order, tokens kept per frame)."""
    mask = retention_mask(rows.view(num_frames, -1, rows.shape[-1]), q)
    return rows[mask.flatten()], mask.sum(dim=1).tolist()
