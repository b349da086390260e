"""Tokenizers the reference engine understands.

A deployment loads its model's Hugging Face tokenizer from a local directory (`HFTokenizer`:
tokenizer.json, with the media tokens the model was trained with); the embedded tiny LLM
also runs with a byte-level tokenizer that needs no file at all. Anything with the same
members works.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class MediaTokens:
    """Ids that frame a media item's embeddings in the prompt."""

    start: int  # <img>
    end: int  # </img>
    context: int  # one placeholder per embedding row


class Tokenizer(Protocol):
    eos_id: int
    media: MediaTokens

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; special tokens follow."""

    BOS, EOS, IMG_START, IMG_END, IMG_CONTEXT = 256, 257, 258, 259, 260
    VOCAB_SIZE = 272  # rounded up

    def __init__(self) -> None:
        self.eos_id = self.EOS
        self.bos_id = self.BOS
        self.media = MediaTokens(self.IMG_START, self.IMG_END, self.IMG_CONTEXT)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        names = {self.BOS: "", self.EOS: "", self.IMG_START: "<img>", self.IMG_END: "</img>", self.IMG_CONTEXT: ""}
        out, pending = [], bytearray()
        for i in ids:
            if i < 256:
                pending.append(i)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            out.append(names.get(i, f"<{i}>"))
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A Hugging Face fast tokenizer from a local directory (no hub access), with the model's media tokens.

    Reads `tokenizer.json`; BOS/EOS from `tokenizer_config.json` (or `config.json`'s ids); the image
    context id from `config.json`'s `img_context_token_id` when present (Nemotron Nano VL, InternVL),
    else the id of `image_context`. `<img>` / `</img>` must be single tokens of the vocabulary."""

    def __init__(self, directory: str | Path, image_start: str = "<img>", image_end: str = "</img>",
                 image_context: str = "<image>"):
        from tokenizers import Tokenizer as FastTokenizer

        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory} (tokenizers load from local directories only)")
        self._tok = FastTokenizer.from_file(str(directory / "tokenizer.json"))
        config = _read_json(directory / "config.json")
        special = _read_json(directory / "tokenizer_config.json")
        context = config.get("img_context_token_id")
        self.media = MediaTokens(self._id(image_start), self._id(image_end),
                                 int(context) if context is not None else self._id(image_context))
        self.bos_id = self._special(special.get("bos_token"), config.get("bos_token_id"))
        eos = self._special(special.get("eos_token"), config.get("eos_token_id"))
        if eos is None:
            raise ValueError(f"{directory}: no eos_token in tokenizer_config.json or eos_token_id in config.json")
        self.eos_id = eos
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def _id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"the tokenizer has no {token!r} token (the model's media tokens must be in its vocabulary)")
        return token_id

    def _special(self, token, fallback_id) -> int | None:
        if isinstance(token, dict):  # {"content": "<s>", ...}
            token = token.get("content")
        if token:
            return self._id(token)
        if isinstance(fallback_id, list):
            fallback_id = fallback_id[0] if fallback_id else None
        return int(fallback_id) if fallback_id is not None else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
