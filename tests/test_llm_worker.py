"""LLM worker against the tiny encoder served over real gRPC: chunked prefill, cache, merge."""

import grpc
import numpy as np
import pytest
import torch

from encoder_service.serving.client import EncoderClient
from encoder_service.config import TilingSpec
from encoder_service.processor import ImageProcessor, MediaInput, Modality, ProcessorConfig
from llm_worker.engine import GenerationRequest, LLMEngine, LLMWorkerConfig, Status
from llm_worker.multimodal import EmbeddingCountMismatch
from llm_worker.tiny import tiny_llm_dir
from tests.conftest import image_bytes


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return str(tiny_llm_dir(tmp_path_factory.mktemp("llm")))


@pytest.fixture(scope="module")
def client(encoder_server):
    with EncoderClient(encoder_server.address, timeout=30) as c:
        c.wait_ready()
        yield c


def _engine(client, llm_dir, **kw) -> LLMEngine:
    return LLMEngine(LLMWorkerConfig(model_dir=llm_dir, record_prompt_logits=True, **kw), client)


def _image(w, h):
    return MediaInput(Modality.IMAGE, image_bytes(w, h, "PNG"))


def _requests():
    shared = _image(128, 64)
    rng = np.random.default_rng()
    video = MediaInput(Modality.VIDEO, rng.integers(0, 256, (3, 48, 64, 3), dtype=np.uint8))
    return [
        GenerationRequest(
            "Compare <image> with <image>; then <video> and <image>.",
            [_image(64, 64), shared, video, _image(64, 192)],
            max_new_tokens=6,
        ),
        GenerationRequest("Again <image>, now beside <image>!", [shared, _image(100, 40)], max_new_tokens=6),
    ]


def _one_shot_logits(engine: LLMEngine, client: EncoderClient, seq) -> torch.Tensor:
    """Independent reference: every item encoded ALONE, placed at its positions, one forward."""
    ids = torch.tensor(seq.layout.token_ids)
    with torch.no_grad():
        embeds = engine.embed_tokens(ids).clone()
        for ref in seq.media:
            rows = client.encode([ref.media]).embeddings
            embeds[ref.span.positions()] = rows
        return engine.model(inputs_embeds=embeds[None]).logits[0]


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 100_000])
def test_chunked_prefill_equals_one_shot(client, llm_dir, chunk_size):
    # Budget for a full chunk of each of the two requests, so every chunk is exactly chunk_size.
    engine = _engine(client, llm_dir, chunk_size=chunk_size, step_token_budget=2 * chunk_size)
    requests = _requests()
    seqs = [engine.add_request(r) for r in requests]
    while engine.has_work():
        engine.step()
    for seq in seqs:
        chunked = torch.cat(seq.prompt_logits)
        assert chunked.shape[0] == seq.prompt_len
        torch.testing.assert_close(chunked, _one_shot_logits(engine, client, seq), rtol=1e-4, atol=1e-4)
        assert seq.prefill_chunks == -(-seq.prompt_len // chunk_size)
    if chunk_size in (7, 64):  # some image really straddles a chunk boundary
        spans = [r.span for s in seqs for r in s.media]
        assert any(sp.offset // chunk_size != (sp.end - 1) // chunk_size for sp in spans)


def test_outputs_do_not_depend_on_chunk_size(client, llm_dir):
    texts = {}
    for chunk_size in (5, 33, 4096):
        outs = _engine(client, llm_dir, chunk_size=chunk_size).generate(_fixed_requests())
        texts[chunk_size] = [o.token_ids for o in outs]
        assert all(len(o.token_ids) == 6 for o in outs)
    assert texts[5] == texts[33] == texts[4096]


def _fixed_requests():
    return [
        GenerationRequest("Look: <image> and <image>.", [_image_seeded(96, 64, 1), _image_seeded(64, 64, 2)], 6),
        GenerationRequest("Here <image>", [_image_seeded(96, 64, 1)], 6),
    ]


def _image_seeded(w, h, seed):
    return MediaInput(Modality.IMAGE, image_bytes(w, h, "PNG", seed=seed))


def test_encoder_called_once_per_distinct_item(client, llm_dir, encoder_server):
    engine = _engine(client, llm_dir, chunk_size=3)  # every image spans many chunks
    before = (encoder_server.counters.encode_calls, encoder_server.counters.items_encoded)
    requests = _requests()  # 6 media references, 5 distinct (one image shared by both requests)
    engine.generate(requests)
    after = (encoder_server.counters.encode_calls, encoder_server.counters.items_encoded)
    assert after[0] - before[0] == 1  # ONE Encode for the whole batch
    assert after[1] - before[1] == 5  # each distinct item once, however many chunks it spans
    assert engine.cache.stats.misses == 5

    # The same media again: served from the cache, no Encode at all.
    engine.generate([GenerationRequest(r.prompt, r.media, 2) for r in requests])
    assert encoder_server.counters.encode_calls == after[0]
    assert engine.cache.stats.hits == 6  # looked up per request: 4 + 2 distinct items


def test_tiny_cache_never_evicts_pinned_and_never_changes_results(client, llm_dir):
    reference = _engine(client, llm_dir, chunk_size=16).generate(_fixed_requests())
    engine = _engine(client, llm_dir, chunk_size=16, step_token_budget=16, cache_bytes=1)
    seqs = [engine.add_request(r) for r in _fixed_requests()]
    while engine.has_work():
        engine.step()
        for seq in seqs:
            if seq.status == Status.PREFILL:
                for key in seq.distinct_keys():
                    assert key in engine.cache and engine.cache.get(key).pins > 0
    assert [engine.output(s).token_ids for s in seqs] == [o.token_ids for o in reference]
    assert engine.cache.stats.evictions > 0 and len(engine.cache) == 0
    assert engine.cache.pinned_keys() == set()


def test_requests_interleave_under_the_step_budget(client, llm_dir):
    engine = _engine(client, llm_dir, chunk_size=8, step_token_budget=24)
    seqs = [engine.add_request(r) for r in _fixed_requests()]
    both_prefilling = False
    while engine.has_work():
        engine.step()
        both_prefilling |= all(s.status == Status.PREFILL and s.num_prefilled > 0 for s in seqs)
    assert both_prefilling


def test_count_mismatch_raises_a_clear_error(client, llm_dir):
    """Worker and encoder disagreeing on tiling (version skew) must fail loudly, not misplace rows."""
    engine = _engine(client, llm_dir)
    skewed = TilingSpec(tile_size=64, max_tiles=4, use_thumbnail=True, tokens_per_tile=16)
    engine.media_counter = ImageProcessor(ProcessorConfig(tiling=skewed))
    engine.add_request(GenerationRequest("<image>", [_image(300, 100)], 2))
    with pytest.raises(EmbeddingCountMismatch, match="placeholders but the encoder returned"):
        while engine.has_work():
            engine.step()
    # The failed request leaves nothing behind, and the engine goes on serving.
    assert not engine.has_work() and engine.cache.pinned_keys() == set()
    engine.media_counter = ImageProcessor(ProcessorConfig(tiling=client.model_info().tiling))
    assert len(engine.generate([GenerationRequest("<image>", [_image(300, 100)], 2)])[0].token_ids) == 2


def test_unreachable_encoder_fails_the_batch_cleanly(client, llm_dir):
    """Encoder errors surface to the caller; cached entries the batch pinned are released."""
    engine = _engine(client, llm_dir)
    cached = _image(64, 64)
    engine.generate([GenerationRequest("<image>", [cached], 1)])  # now in the cache, unpinned
    engine.encoder = EncoderClient("127.0.0.1:1", timeout=2)  # nothing listens there
    engine.add_request(GenerationRequest("<image> <image>", [cached, _image(80, 64)], 1))
    with pytest.raises(grpc.RpcError):
        engine.step()
    assert not engine.has_work() and engine.cache.pinned_keys() == set()


def test_marker_count_must_match_media(client, llm_dir):
    engine = _engine(client, llm_dir)
    with pytest.raises(ValueError, match="markers"):
        engine.add_request(GenerationRequest("<image> <image>", [_image(64, 64)]))
