"""Running the LLM: any Hugging Face causal LM that takes `inputs_embeds`, one prefill chunk or one greedy
decode token at a time, with the media rows merged into the chunk's embeddings."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from llm_worker.multimodal import merge_chunk
from llm_worker.prompt import MediaSpan


class ModelRunner:
    def __init__(self, model_dir: str, device: str, dtype: str):
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"LLM checkpoint dir {model_dir} does not exist (no hub downloads)")
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.embed_tokens = self.model.get_input_embeddings()

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.embed_tokens.num_embeddings

    def new_kv(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def prefill(self, kv: DynamicCache, token_ids: list[int], start: int,
                media: list[tuple[MediaSpan, torch.Tensor]]) -> torch.Tensor:
        """Prompt positions [start, start + len(token_ids)) into `kv`, media rows merged at their placeholders;
        returns the chunk's logits."""
        ids = torch.tensor(token_ids, device=self.device)
        embeds = self.embed_tokens(ids).clone()
        merge_chunk(embeds, start, media)
        return self.model(inputs_embeds=embeds[None], past_key_values=kv, use_cache=True).logits[0]

    @torch.inference_mode()
    def decode(self, kv: DynamicCache, token: int) -> torch.Tensor:
        """One token into `kv`; returns the next token's logits."""
        ids = torch.tensor([[token]], device=self.device)
        return self.model(input_ids=ids, past_key_values=kv, use_cache=True).logits[0, -1]
