"""A tiny random InternVL (Hugging Face format) that vLLM runs on a CPU and this pool encodes for: one
checkpoint directory for both sides (weights, tokenizer with InternVL's image tokens, a chat
template, the image processor settings). For tests, benches and trying the integration without
real weights; nothing is downloaded.

    python -m encoder_service.integrations.vllm.tiny_model DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TILE, PATCH = 64, 8  # 8x8 patches per tile, pixel shuffle 2x2: 16 tokens per tile
MAX_TILES = 6
IMAGE_MEAN, IMAGE_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SPECIAL = ["<|endoftext|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["Describe the image. Compare the two pictures. What is in this picture? Answer briefly. user assistant"]
# vLLM's OpenAI server needs a chat template; an image part becomes <IMG_CONTEXT> and a video part <video>,
# which vLLM expands (a video: one line of <video> tokens per sampled frame).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% elif c['type'] == 'video' %}<video>"
    "{% else %}<IMG_CONTEXT>{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build(path: str | Path, seed: int = 0, max_tiles: int = MAX_TILES, llm_hidden: int = 128) -> Path:
    """Write the checkpoint directory (config.json, model.safetensors, tokenizer, processor config)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    tokenizer.save_pretrained(path)
    config = InternVLConfig(
        vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           image_size=[TILE, TILE], patch_size=[PATCH, PATCH], attention_bias=True,
                           use_mean_pooling=True, hidden_act="gelu", norm_type="layer_norm"),
        text_config=dict(model_type="qwen2", vocab_size=512, hidden_size=llm_hidden, intermediate_size=2 * llm_hidden,
                         num_hidden_layers=2, num_attention_heads=llm_hidden // 32, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         eos_token_id=bpe.token_to_id("<|endoftext|>")),
        image_token_id=bpe.token_to_id("<IMG_CONTEXT>"), image_seq_length=(TILE // PATCH // 2) ** 2,
        downsample_ratio=0.5,
    )
    generator = torch.Generator().manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    with torch.no_grad():  # activations O(1), layer scale well away from 0, and an LLM whose greedy
        for name, p in model.named_parameters():  # tokens follow its inputs (the image rows too)
            noise = torch.randn(p.shape, generator=generator)
            if "lambda" in name:
                p.copy_(0.5 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif "language_model" in name or "lm_head" in name:
                p.copy_(noise / p.shape[-1] ** 0.5 * (4.0 if "embed" in name else 1.5))
            else:
                p.copy_(0.05 * noise)
    model.save_pretrained(path)
    image_processor = {
        "image_processor_type": "GotOcr2ImageProcessor", "crop_to_patches": True, "min_patches": 1,
        "max_patches": max_tiles, "size": {"height": TILE, "width": TILE}, "resample": 3, "do_resize": True,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD,
    }
    video_processor = {"video_processor_type": "InternVLVideoProcessor", "size": {"height": TILE, "width": TILE},
                       "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD, "do_resize": True, "do_rescale": True,
                       "do_normalize": True, "resample": 3, "rescale_factor": 1 / 255}
    (path / "processor_config.json").write_text(json.dumps({
        "processor_class": "InternVLProcessor", "image_seq_length": config.image_seq_length,
        "image_processor": image_processor, "video_processor": video_processor}, indent=2))
    return path


if __name__ == "__main__":
    print(build(sys.argv[1]))
