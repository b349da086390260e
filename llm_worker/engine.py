"""Reference LLM engine: chunked prefill and greedy decode scheduled over a pool of media rows
(running the model: `model_runner`; fetching rows: `media_fetch`; placing them: `multimodal`).

A scheduler step:
1. admits waiting requests: ONE Encode call for all their uncached media, pinned in the cache; with
   `progressive_prefill` a streamed one (`StreamedFetch`) that does not wait for the rows;
2. spends a per-step token budget on running requests in arrival order: a prefill chunk
   (at most `chunk_size` prompt tokens, and never past the region of an item whose rows have not
   arrived yet) or one decode token each;
3. releases a request's pins once its prefill is over.
Media rows reach each chunk by slicing cached embeddings (`merge_chunk`), never by re-encoding.
"""

from __future__ import annotations

import enum
import itertools
import uuid
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from encoder_service.client.checks import CheckedEncoder, Encoder
from encoder_service.contract.media import MediaInput
from encoder_service.contract.plan import MediaPlanner
from encoder_service.fingerprint import of_checkpoint
from llm_worker.media_fetch import MediaRef, StreamedFetch, fetch_embeddings
from llm_worker.mm_cache import EmbeddingCache, item_cache_key
from llm_worker.model_runner import ModelRunner
from llm_worker.multimodal import media_region, relayout_frames
from llm_worker.prompt import PromptLayout, count_markers, layout_prompt
from llm_worker.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer


@dataclass
class LLMWorkerConfig:
    model_dir: str | None = None  # None: the embedded tiny random Llama
    tokenizer_dir: str | None = None  # a Hugging Face tokenizer.json directory; None: the byte tokenizer
    chunk_size: int = 256  # prompt tokens per prefill chunk
    step_token_budget: int = 512  # tokens (prefill + decode) one scheduler step may process
    cache_bytes: int = 1 << 30  # media embedding cache budget
    device: str = "cpu"
    dtype: str = "float32"  # the LLM's weights and activations (bfloat16 on GPUs)
    record_prompt_logits: bool = False  # keep every prompt position's logits (tests, debugging)
    # The checkpoint directory the pool must serve (its vision tower, preprocessing and width, by fingerprint):
    # a pool serving anything else is refused at connect and on any answer. None: not checked.
    encoder_checkpoint: str | None = None
    # Prefill text and the first items while later ones are still encoded (the pool streams items as they
    # are ready); False: the whole Encode answer first, then prefill.
    progressive_prefill: bool = True


@dataclass
class GenerationRequest:
    prompt: str  # text with one `<image>` / `<video>` marker per media item
    media: list[MediaInput] = field(default_factory=list)
    max_new_tokens: int = 16
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


class Status(enum.Enum):
    WAITING = "waiting"  # laid out, media not yet fetched
    PREFILL = "prefill"
    DECODE = "decode"
    DONE = "done"


@dataclass
class Sequence:
    request: GenerationRequest
    layout: PromptLayout
    media: list[MediaRef]
    arrival: int
    status: Status = Status.WAITING
    num_prefilled: int = 0
    kv: DynamicCache | None = None
    output_ids: list[int] = field(default_factory=list)
    last_logits: torch.Tensor | None = None
    prompt_logits: list[torch.Tensor] = field(default_factory=list)
    prefill_chunks: int = 0
    fetch: StreamedFetch | None = None  # its media still arriving (progressive prefill)
    laid_out: set[int] = field(default_factory=set)  # media items whose rows are in and whose region is final

    @property
    def prompt_len(self) -> int:
        return len(self.layout.token_ids)

    def distinct_keys(self) -> list[str]:
        return list(dict.fromkeys(r.key for r in self.media))


@dataclass
class GenerationOutput:
    request_id: str
    token_ids: list[int]
    text: str
    prompt_tokens: int
    prefill_chunks: int
    media_tokens: list[int]  # embedding rows per media item


class LLMEngine:
    def __init__(self, cfg: LLMWorkerConfig, encoder: Encoder, tokenizer: Tokenizer | None = None):
        from llm_worker.tiny import tiny_llm_dir

        self.cfg = cfg
        if cfg.encoder_checkpoint:
            encoder = CheckedEncoder(encoder, of_checkpoint(cfg.encoder_checkpoint))
        self.encoder = encoder
        self.tokenizer = tokenizer or (HFTokenizer(cfg.tokenizer_dir) if cfg.tokenizer_dir else ByteTokenizer())
        self.runner = ModelRunner(cfg.model_dir or tiny_llm_dir(), cfg.device, cfg.dtype)
        vocab = getattr(self.tokenizer, "vocab_size", None)
        if vocab is not None and vocab > self.runner.vocab_size:
            raise ValueError(f"the tokenizer has {vocab} ids, the LLM's embedding table {self.runner.vocab_size}")
        info = self.encoder.model_info()
        if info.hidden_size != self.runner.hidden_size:
            raise ValueError(
                f"encoder emits {info.hidden_size}-wide embeddings, the LLM expects {self.runner.hidden_size}"
            )
        # Token counts from sizes alone: the same rules the encoder plans with.
        self.planner = MediaPlanner.for_model(info)
        self.cache = EmbeddingCache(cfg.cache_bytes)
        self.encode_calls = 0
        self._fetches: list[StreamedFetch] = []  # streamed Encodes still delivering
        self._sequences: list[Sequence] = []
        self._arrivals = itertools.count()

    # ------------------------------------------------------------------ requests

    def add_request(self, request: GenerationRequest) -> Sequence:
        """Lay the prompt out now: placeholder counts come from media sizes, before any encoding."""
        if len(count_markers(request.prompt)) != len(request.media):
            raise ValueError(
                f"request {request.request_id}: {len(count_markers(request.prompt))} markers, "
                f"{len(request.media)} media items"
            )
        plans = [self.planner.plan(item) for item in request.media]
        layout = layout_prompt(request.prompt, [media_region(m, p) for m, p in zip(request.media, plans)],
                               self.tokenizer)
        refs = [MediaRef(item_cache_key(m, p.pruning_rate), span, m, p.pruned)
                for m, p, span in zip(request.media, plans, layout.spans)]
        seq = Sequence(request, layout, refs, next(self._arrivals))
        self._sequences.append(seq)
        return seq

    def has_work(self) -> bool:
        return any(s.status != Status.DONE for s in self._sequences)

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        seqs = [self.add_request(r) for r in requests]
        while any(s.status != Status.DONE for s in seqs):
            self.step()
        return [self.output(s) for s in seqs]

    def output(self, seq: Sequence) -> GenerationOutput:
        return GenerationOutput(
            request_id=seq.request.request_id,
            token_ids=list(seq.output_ids),
            text=self.tokenizer.decode(seq.output_ids),
            prompt_tokens=seq.prompt_len,
            prefill_chunks=seq.prefill_chunks,
            media_tokens=[r.span.length for r in seq.media],
        )

    # ------------------------------------------------------------------ scheduling

    def step(self) -> list[Sequence]:
        """One scheduler step; returns the sequences that finished in it."""
        waiting = [s for s in self._sequences if s.status == Status.WAITING]
        if waiting:
            self._admit(waiting)
        self._receive()
        budget = self.cfg.step_token_budget
        finished = []
        for seq in sorted((s for s in self._sequences if s.status in (Status.PREFILL, Status.DECODE)), key=lambda s: s.arrival):
            if budget <= 0:
                break
            try:
                if seq.status == Status.PREFILL:
                    n = min(self.cfg.chunk_size, self._prefillable_until(seq) - seq.num_prefilled, budget)
                    if n <= 0:  # its next chunk needs rows still on their way
                        continue
                    self._prefill_chunk(seq, n)
                    budget -= n
                else:
                    self._decode_one(seq)
                    budget -= 1
            except Exception:
                self._abort([seq], release=seq.status == Status.PREFILL)
                raise
            if seq.status == Status.DONE:
                finished.append(seq)
        self._sequences = [s for s in self._sequences if s.status != Status.DONE]
        if budget == self.cfg.step_token_budget and self._fetches:  # nothing could run: wait for rows
            self._receive(wait_s=0.05)
        return finished

    def _admit(self, seqs: list[Sequence]) -> None:
        if self.cfg.progressive_prefill and hasattr(self.encoder, "encode_stream"):
            fetch = StreamedFetch([s.media for s in seqs], self.encoder, self.cache)
            self.encode_calls += fetch.calls
            if not fetch.finished:
                self._fetches.append(fetch)
            for seq in seqs:
                seq.fetch = fetch
            self._start_prefill(seqs)
            self._receive()
            return
        try:
            self.encode_calls += fetch_embeddings([s.media for s in seqs], self.encoder, self.cache)
        except Exception:
            self._abort(seqs, release=False)  # fetch_embeddings left no pins behind
            raise
        try:
            for seq in seqs:  # pruned videos get their real per-frame layout before any chunk is prefilled
                for i, ref in enumerate(seq.media):
                    seq.layout = relayout_frames(seq.layout, i, self.cache.get(ref.key).tokens_per_frame, ref.pruned)
                    ref.span = seq.layout.spans[i]
        except Exception:
            self._abort(seqs, release=True)
            raise
        for seq in seqs:
            seq.laid_out = set(range(len(seq.media)))
        self._start_prefill(seqs)

    def _receive(self, wait_s: float = 0.0) -> None:
        """Streamed rows into the cache; each item that arrived gets its final region (a pruned video's
        per-frame layout) before any chunk reaches it. A failed stream fails the requests waiting on it."""
        for fetch in list(self._fetches):
            try:
                fetch.drain(wait_s)
            except Exception:
                self._fetches.remove(fetch)
                self._abort([s for s in self._sequences if s.fetch is fetch], release=True)
                raise
            if fetch.finished:
                self._fetches.remove(fetch)
            wait_s = 0.0
        for seq in self._sequences:
            if seq.status != Status.PREFILL or len(seq.laid_out) == len(seq.media):
                continue
            for i, ref in enumerate(seq.media):
                if i in seq.laid_out or not seq.fetch.ready(ref.key):
                    continue
                try:
                    seq.layout = relayout_frames(seq.layout, i, self.cache.get(ref.key).tokens_per_frame, ref.pruned)
                except Exception:
                    self._abort([seq], release=True)
                    raise
                ref.span = seq.layout.spans[i]
                seq.laid_out.add(i)

    def _prefillable_until(self, seq: Sequence) -> int:
        """Prompt positions before the region of the first item not in yet (all of it once every item is)."""
        waiting = [ref.span.start for i, ref in enumerate(seq.media) if i not in seq.laid_out]
        return min(waiting, default=seq.prompt_len)

    def _start_prefill(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.kv = self.runner.new_kv()
            seq.status = Status.PREFILL

    def _abort(self, seqs: list[Sequence], release: bool) -> None:
        """A request that cannot go on leaves nothing behind: no pins, no KV cache, no queue entry."""
        for seq in seqs:
            if release:
                self._release(seq)
            seq.status, seq.kv = Status.DONE, None
        self._sequences = [s for s in self._sequences if s not in seqs]

    # ------------------------------------------------------------------ model work

    def _prefill_chunk(self, seq: Sequence, n: int) -> None:
        start, end = seq.num_prefilled, seq.num_prefilled + n
        overlapping = [r for r in seq.media if r.span.offset < end and r.span.end > start]
        logits = self.runner.prefill(seq.kv, seq.layout.token_ids[start:end], start,
                                     [(r.span, self._media_rows(r)) for r in overlapping])
        if self.cfg.record_prompt_logits:
            seq.prompt_logits.append(logits.float().cpu())
        seq.num_prefilled = end
        seq.prefill_chunks += 1
        if end == seq.prompt_len:
            self._release(seq)
            seq.status = Status.DECODE
            self._emit(seq, logits[-1])

    def _media_rows(self, ref: MediaRef) -> torch.Tensor:
        """All embedding rows of an item (pinned in the cache while its request is in prefill)."""
        return self.cache.get(ref.key).embeddings

    def _release(self, seq: Sequence) -> None:
        keys = seq.distinct_keys()
        for key in seq.fetch.abandon(keys) if seq.fetch is not None else keys:
            self.cache.unpin(key)

    def _decode_one(self, seq: Sequence) -> None:
        self._emit(seq, self.runner.decode(seq.kv, seq.output_ids[-1]))

    def _emit(self, seq: Sequence, logits: torch.Tensor) -> None:
        seq.last_logits = logits.float().cpu()
        token = int(logits.argmax())
        seq.output_ids.append(token)
        if token == self.tokenizer.eos_id or len(seq.output_ids) >= seq.request.max_new_tokens:
            seq.status = Status.DONE
            seq.kv = None
