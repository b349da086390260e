"""Tokenizers the reference engine understands.

The embedded tiny LLM uses a byte-level tokenizer (no vocabulary file to
download); a deployment plugs in any object with the same three members.
"""

from __future__ import annotations

from dataclasses import dataclass
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
