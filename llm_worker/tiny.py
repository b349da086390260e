"""The embedded tiny LLM: a random Llama whose hidden size matches the tiny encoder's output."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from encoder_service.artifacts import build_once, cache_root
from encoder_service.config import tiny_encoder_config
from llm_worker.tokenizer import ByteTokenizer

TINY_LLM_NAME = "tiny-llama-random"


def tiny_llm_dir(root: str | os.PathLike | None = None) -> Path:
    def write(path: Path) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(4321)
        cfg = LlamaConfig(
            vocab_size=ByteTokenizer.VOCAB_SIZE,
            hidden_size=tiny_encoder_config().output_size,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            bos_token_id=ByteTokenizer.BOS,
            eos_token_id=ByteTokenizer.EOS,
        )
        LlamaForCausalLM(cfg).save_pretrained(path)

    return build_once(cache_root(root) / TINY_LLM_NAME, write)
