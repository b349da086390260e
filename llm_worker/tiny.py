"""The embedded tiny LLM: a random Llama whose hidden size matches the tiny encoder's output."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from encoder_service.artifacts import build_once, cache_root
from encoder_service.config import tiny_encoder_config
from llm_worker.tokenizer import ByteTokenizer

TINY_LLM_NAME = "tiny-llama-random"
TINY_TOKENIZER_NAME = "tiny-bpe-tokenizer"
TINY_TOKENIZER_CORPUS = (
    "Describe the image. Compare the two pictures and the video. What happens in the clip? "
    "Frame 1 sampled at 0.00 seconds: the scene. Answer briefly, then explain what changed."
)


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


def tiny_tokenizer_dir(root: str | os.PathLike | None = None) -> Path:
    """A real Hugging Face tokenizer (byte-level BPE trained here on a few sentences, with Nemotron Nano VL's
    media tokens), small enough for the tiny LLM's embedding table: tests and demos load it through
    `HFTokenizer` exactly as a deployment loads its model's."""

    def write(path: Path) -> None:
        import json

        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<s>", "</s>", "<img>", "</img>", "<image>"]
        trainer = trainers.BpeTrainer(vocab_size=ByteTokenizer.VOCAB_SIZE, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator([TINY_TOKENIZER_CORPUS], trainer)
        path.mkdir(parents=True, exist_ok=True)
        tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
        (path / "config.json").write_text(json.dumps({"img_context_token_id": tok.token_to_id("<image>")}))

    return build_once(cache_root(root) / TINY_TOKENIZER_NAME, write)
