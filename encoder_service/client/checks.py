"""The checks a consumer runs before it uses the pool's rows, written once for the LLM worker and every
engine integration: the pool serves the model the consumer expects (by fingerprint, at connect and on
every answer, whichever replica gave it), and an answer has one entry per item sent and the rows and
width the prompt expects."""

from __future__ import annotations

from typing import Protocol

import torch

from encoder_service.contract.media import MediaInput
from encoder_service.contract.model_info import ModelFingerprint, ModelInfo
from encoder_service.contract.result import EncodeResult


class Encoder(Protocol):
    """What a consumer needs of the pool (`EncoderClient`, `PoolEncoderClient`)."""

    def encode(self, items: list[MediaInput]) -> EncodeResult: ...

    def model_info(self) -> ModelInfo: ...


class EmbeddingCountMismatch(ValueError):
    """The encoder returned a different number of items or rows than the prompt has placeholders for."""


class WrongEncoder(ValueError):
    """The pool serves another model than the one this consumer's embeddings must come from."""


def check_pool_model(info: ModelInfo, expected: ModelFingerprint, where: str = "the encoder pool") -> None:
    """At connect: the pool's fingerprint (GetModelInfo) must be the expected model's."""
    served = info.fingerprint
    problems = ["it reports no model fingerprint"] if served is None else served.mismatches(expected)
    if problems:
        raise WrongEncoder(f"{where} serves another model than expected: {'; '.join(problems)}")


def check_answer_model(models: set[str], expected: ModelFingerprint) -> None:
    """On every answer: the contract digests it carries (`extras["model"]`, of each part) are the expected one."""
    if models != {expected.contract}:
        raise WrongEncoder("a replica of the encoder pool answered for another model than expected")


def answer_models(result: EncodeResult) -> set[str]:
    """The contract digests of an answer and of every part it was assembled from."""
    return {answer.get("model") for answer in [result.extras, *result.extras.get("parts", [])]}


def check_answer_count(sent: int, result: EncodeResult) -> None:
    if len(result.items) != sent:
        raise EmbeddingCountMismatch(f"sent {sent} items, encoder answered {len(result.items)}")


def check_rows(rows: torch.Tensor | tuple[int, int], placeholders: int, hidden_size: int, where: str) -> None:
    """One item's rows (or their shape, for rows not read yet) against the prompt: as many as its
    placeholders, as wide as the LLM."""
    count, width = tuple(rows.shape) if isinstance(rows, torch.Tensor) else rows
    if width != hidden_size:
        raise EmbeddingCountMismatch(f"{where}: rows are {width} wide, the LLM's hidden size is {hidden_size}")
    if count != placeholders:
        raise EmbeddingCountMismatch(f"{where}: {count} rows, the prompt has {placeholders} placeholders")


class CheckedEncoder:
    """The pool, every answer checked against the model this consumer expects: at connect (GetModelInfo)
    and on each response, so a replica changed under the consumer is refused, never merged."""

    def __init__(self, encoder: Encoder, expected: ModelFingerprint):
        self.encoder, self.expected = encoder, expected
        check_pool_model(encoder.model_info(), expected)

    def model_info(self) -> ModelInfo:
        return self.encoder.model_info()

    def encode(self, items: list[MediaInput]) -> EncodeResult:
        result = self.encoder.encode(items)
        check_answer_model(answer_models(result), self.expected)
        return result

    def encode_stream(self, items: list[MediaInput], on_item) -> EncodeResult:
        """Each streamed item is checked before it is passed on (its rows are used before the stream ends)."""
        def checked(index, item, rows, model: str) -> None:
            check_answer_model({model}, self.expected)
            on_item(index, item, rows, model)

        return self.encoder.encode_stream(items, checked)
