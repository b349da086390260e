"""LLM worker against the tiny encoder served over real gRPC: chunked prefill, cache, merge."""

import random
import time

import grpc
import numpy as np
import pytest
import torch

from encoder_service.client.checks import EmbeddingCountMismatch
from encoder_service.client.endpoint import EncoderClient
from encoder_service.contract.media import MediaInput, Modality, VideoSampling
from encoder_service.contract.plan import MediaPlanner, PlanningRules
from encoder_service.contract.tokens import TilingSpec
from llm_worker.engine import GenerationRequest, LLMEngine, LLMWorkerConfig, Status
from llm_worker.tiny import tiny_llm_dir, tiny_tokenizer_dir
from llm_worker.tokenizer import HFTokenizer
from tests.conftest import image_bytes
from tests.video_fixture import mp4_bytes


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
        embeds = engine.runner.embed_tokens(ids).clone()
        for ref in seq.media:
            rows = client.encode([ref.media]).embeddings  # bf16 from a GPU encoder: the LLM's dtype, as it merges them
            embeds[ref.span.positions()] = rows.to(embeds.dtype)
        return engine.runner.model(inputs_embeds=embeds[None]).logits[0]


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 100_000])
def test_chunked_prefill_equals_one_shot(client, llm_dir, chunk_size, progressive):
    # Budget for a full chunk of each of the two requests, so every chunk is exactly chunk_size (without
    # progressive prefill; with it, a chunk may stop early at an item whose rows are still streaming).
    engine = _engine(client, llm_dir, chunk_size=chunk_size, step_token_budget=2 * chunk_size,
                     progressive_prefill=progressive)
    requests = _requests()
    seqs = [engine.add_request(r) for r in requests]
    while engine.has_work():
        engine.step()
    for seq in seqs:
        chunked = torch.cat(seq.prompt_logits)
        assert chunked.shape[0] == seq.prompt_len
        torch.testing.assert_close(chunked, _one_shot_logits(engine, client, seq), rtol=1e-4, atol=1e-4)
        if progressive:
            assert seq.prefill_chunks >= -(-seq.prompt_len // chunk_size)
        else:
            assert seq.prefill_chunks == -(-seq.prompt_len // chunk_size)
    if chunk_size in (7, 64):  # some image really straddles a chunk boundary
        spans = [r.span for s in seqs for r in s.media]
        assert any(sp.offset // chunk_size != (sp.end - 1) // chunk_size for sp in spans)


class LateAndShuffled:
    """The real pool (EncodeStream over gRPC), its items handed on in a random order, each late: prefill
    must wait exactly for the rows its chunk needs."""

    def __init__(self, client: EncoderClient, engine_chunks):
        self.client, self.rng = client, random.Random()
        self.engine_chunks = engine_chunks  # () -> prefill chunks run so far
        self.chunks_before_last_item = 0

    def model_info(self):
        return self.client.model_info()

    def encode(self, items):
        return self.client.encode(items)

    def encode_stream(self, items, on_item):
        arrived = []
        result = self.client.encode_stream(items, lambda *event: arrived.append(event))
        self.rng.shuffle(arrived)
        for event in arrived:
            time.sleep(self.rng.uniform(0.02, 0.06))
            on_item(*event)
        self.chunks_before_last_item = self.engine_chunks()
        return result


@pytest.mark.parametrize("chunk_size", [3, 16, 64])
def test_progressive_prefill_with_items_late_and_in_any_order_equals_one_shot(client, llm_dir, chunk_size):
    """Items arrive in random order, each late: text and the items already in are prefilled meanwhile, and
    the logits equal one shot over the final layout (pruned videos re-laid out on arrival included)."""
    seqs = []
    late = LateAndShuffled(client, lambda: sum(s.prefill_chunks for s in seqs))
    engine = LLMEngine(LLMWorkerConfig(model_dir=llm_dir, record_prompt_logits=True, chunk_size=chunk_size,
                                       step_token_budget=2 * chunk_size), late)
    frames, clip = _pruned_videos()
    seqs += [engine.add_request(r) for r in _requests() + _pruned_requests(frames, clip)[:1]]
    while engine.has_work():
        engine.step()
    assert late.chunks_before_last_item > 0  # prefill really started before the last item arrived
    for seq in seqs:
        torch.testing.assert_close(torch.cat(seq.prompt_logits), _one_shot_logits(engine, client, seq),
                                   rtol=1e-4, atol=1e-4)
    assert not engine.cache.pinned_keys()


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
                for key in seq.distinct_keys():  # every item in (a streamed one once it arrived) is pinned
                    if seq.fetch is None or seq.fetch.ready(key):
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
    engine.planner = MediaPlanner(PlanningRules(tiling=skewed))
    engine.add_request(GenerationRequest("<image>", [_image(300, 100)], 2))
    with pytest.raises(EmbeddingCountMismatch, match="placeholders but the encoder returned"):
        while engine.has_work():
            engine.step()
    # The failed request leaves nothing behind, and the engine goes on serving.
    assert not engine.has_work() and engine.cache.pinned_keys() == set()
    engine.planner = MediaPlanner(PlanningRules(tiling=client.model_info().tiling))
    assert len(engine.generate([GenerationRequest("<image>", [_image(300, 100)], 2)])[0].token_ids) == 2


def test_unreachable_encoder_fails_the_batch_cleanly(client, llm_dir):
    """Encoder errors surface to the caller; cached entries the batch pinned are released."""
    engine = _engine(client, llm_dir)
    cached = _image(64, 64)
    engine.generate([GenerationRequest("<image>", [cached], 1)])  # now in the cache, unpinned
    engine.encoder = EncoderClient("127.0.0.1:1", timeout=2)  # nothing listens there
    engine.add_request(GenerationRequest("<image> <image>", [cached, _image(80, 64)], 1))
    with pytest.raises(grpc.RpcError):  # on the step that learns of it (streamed: a later one)
        while engine.has_work():
            engine.step()
    assert not engine.has_work() and engine.cache.pinned_keys() == set()


def test_marker_count_must_match_media(client, llm_dir):
    engine = _engine(client, llm_dir)
    with pytest.raises(ValueError, match="markers"):
        engine.add_request(GenerationRequest("<image> <image>", [_image(64, 64)]))


# ---------------------------------------------------------------- EVS-pruned videos


def _pruned_videos():
    """Two pruned videos whose EVS cut falls between moving and static frames (robust to float noise):
    frames [A, A, B, B] at q = 0.5 keep 32 of 64 rows, [16, 0, 16, 0]; an MP4 of [C, C, C, D, D, D]
    at q = 0.66 keeps 32 of 96, [16, 0, 0, 16, 0, 0], with timestamps."""
    rng = np.random.default_rng()
    a, b, c, d = rng.integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)
    frames = MediaInput(Modality.VIDEO, np.stack([a, a, b, b]), pruning_rate=0.5)
    clip = MediaInput(Modality.VIDEO, mp4_bytes(np.stack([c, c, c, d, d, d])), pruning_rate=0.66,
                      sampling=VideoSampling(num_frames=6))
    return frames, clip


def _pruned_requests(frames, clip):
    unpruned = MediaInput(Modality.VIDEO, np.random.default_rng().integers(0, 256, (3, 48, 64, 3), dtype=np.uint8),
                          pruning_rate=0.0)
    shared = _image(128, 64)
    return [
        GenerationRequest("Watch <video> beside <image>, then <video>; and <video>.",
                          [frames, shared, clip, unpruned], max_new_tokens=4),
        GenerationRequest("Again <video> with <image>", [clip, shared], max_new_tokens=4),
    ]


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 100_000])
def test_chunked_prefill_with_pruned_videos_equals_one_shot(client, llm_dir, encoder_server, chunk_size):
    """Pruned videos are laid out as [K, 0, ...] before encoding and re-laid out with the encoder's
    per-frame counts before their first chunk; chunked logits equal one shot over the final layout,
    and each distinct item is encoded once however many chunks it spans."""
    engine = _engine(client, llm_dir, chunk_size=chunk_size, step_token_budget=2 * chunk_size)
    frames, clip = _pruned_videos()
    requests = _pruned_requests(frames, clip)
    seqs = [engine.add_request(r) for r in requests]
    before_layout = [list(s.layout.token_ids) for s in seqs]
    assert seqs[0].media[0].span.frame_counts == [32, 0, 0, 0]  # the dummy layout, final length
    calls, items = encoder_server.counters.encode_calls, encoder_server.counters.items_encoded
    while engine.has_work():
        engine.step()
    assert encoder_server.counters.encode_calls - calls == 1
    assert encoder_server.counters.items_encoded - items == 4  # frames, shared image, clip, unpruned
    assert seqs[0].media[0].span.frame_counts == [16, 0, 16, 0]
    assert seqs[0].media[2].span.frame_counts == [16, 0, 0, 16, 0, 0]
    assert seqs[1].media[0].span.frame_counts == [16, 0, 0, 16, 0, 0]  # same counts, same layout
    assert seqs[0].media[3].span.frame_counts == [16, 16, 16]
    for seq, ids in zip(seqs, before_layout):
        assert len(seq.layout.token_ids) == len(ids)  # re-layout never moves the rest of the prompt
        chunked = torch.cat(seq.prompt_logits)
        assert chunked.shape[0] == seq.prompt_len
        torch.testing.assert_close(chunked, _one_shot_logits(engine, client, seq), rtol=1e-4, atol=1e-4)
    text = engine.tokenizer.decode(seqs[1].layout.token_ids)  # placeholders decode to nothing
    # vLLM's layout (get_video_repl): a new line before every frame but the first; index x int(1000 / fps) ms.
    assert "\n".join(f"Frame {f + 1} sampled at {f / 10:.2f} seconds: <img></img>" for f in range(6)) in text
    if chunk_size in (7, 64):  # a pruned video really straddles a chunk boundary
        spans = [r.span for s in seqs for r in s.media if r.pruned]
        assert any(sp.offset // chunk_size != (sp.end - 1) // chunk_size for sp in spans)


def test_pruned_video_from_the_cache_gets_the_same_layout_without_encoding(client, llm_dir, encoder_server):
    engine = _engine(client, llm_dir, chunk_size=16)
    frames, clip = _pruned_videos()
    first = engine.generate(_pruned_requests(frames, clip)[1:])
    calls = encoder_server.counters.encode_calls
    seq = engine.add_request(GenerationRequest("Again <video> with <image>", [clip, _image(128, 64)], 4))
    while engine.has_work():
        engine.step()
    assert encoder_server.counters.encode_calls == calls + 1  # only the new image: the clip came from the cache
    assert seq.media[0].span.frame_counts == [16, 0, 0, 16, 0, 0]
    assert engine.cache.stats.hits >= 1 and first[0].media_tokens[0] == 32
    # Another rate is another entry (other rows): encoded, not served from the cache.
    other = MediaInput(Modality.VIDEO, clip.data, pruning_rate=0.0, sampling=clip.sampling)
    engine.generate([GenerationRequest("<video>", [other], 1)])
    assert encoder_server.counters.encode_calls == calls + 2


def test_real_hf_tokenizer_lays_out_pruned_videos_from_its_own_ids(client, llm_dir, tmp_path):
    """A Hugging Face tokenizer.json loaded from a local directory: the media tokens are its own ids
    (the context id from config.json), separators are its BPE tokens, and chunked prefill over the
    re-laid-out prompt still equals one shot."""
    tokenizer_dir = tiny_tokenizer_dir(tmp_path)
    engine = _engine(client, llm_dir, chunk_size=7, step_token_budget=14, tokenizer_dir=str(tokenizer_dir))
    tok = engine.tokenizer
    assert isinstance(tok, HFTokenizer)
    assert (tok.media.start, tok.media.end, tok.media.context) == (tok.encode("<img>")[0], tok.encode("</img>")[0],
                                                                   tok.encode("<image>")[0])
    frames, clip = _pruned_videos()
    seqs = [engine.add_request(r) for r in _pruned_requests(frames, clip)]
    while engine.has_work():
        engine.step()
    seq = seqs[0]
    assert seq.layout.token_ids[0] == tok.bos_id
    assert seq.media[2].span.frame_counts == [16, 0, 0, 16, 0, 0]
    separator = tok.encode("\nFrame 4 sampled at 0.30 seconds: ")
    start = seq.media[2].span.runs[3].offset - 1 - len(separator)
    assert seq.layout.token_ids[start : start + len(separator)] == separator
    for s in seqs:
        torch.testing.assert_close(torch.cat(s.prompt_logits), _one_shot_logits(engine, client, s), rtol=1e-4, atol=1e-4)
    assert "</img>\nFrame 6 sampled at 0.50 seconds: <img></img>" in tok.decode(seq.layout.token_ids)


def test_a_client_supplied_content_hash_never_shares_cached_rows(client, llm_dir, encoder_server):
    """Two different images that claim the same content_hash are two cache entries, each with its
    own rows: the cache key is computed from the bytes, never taken from the request."""
    a, b = _image_seeded(64, 48, 101), _image_seeded(64, 48, 102)
    a.content_hash = b.content_hash = "same-claimed-hash"
    engine = _engine(client, llm_dir, chunk_size=8)
    before = encoder_server.counters.items_encoded
    engine.generate([GenerationRequest("<image> then <image>", [a, b], 1)])
    assert encoder_server.counters.items_encoded - before == 2 and len(engine.cache) == 2
    rows = [engine.cache.get(key).embeddings for key in list(engine.cache._entries)]
    assert not torch.equal(rows[0], rows[1])
    direct = client.encode([a, b])
    for got in rows:
        assert any(torch.equal(got, want) for want in direct.split())


def test_a_pool_serving_another_model_is_refused(client, llm_dir, encoder_server, tiny_checkpoint, tmp_path):
    """The contract handshake: the worker names the checkpoint its embeddings must come from."""
    from encoder_service.client.checks import WrongEncoder
    from encoder_service.config import tiny_encoder_config
    from encoder_service.models import save_checkpoint
    from encoder_service.models.checkpoint import random_encoder

    engine = _engine(client, llm_dir, encoder_checkpoint=str(tiny_checkpoint))
    [out] = engine.generate([GenerationRequest("Look <image>", [_image(64, 64)], max_new_tokens=2)])
    assert len(out.token_ids) == 2
    other = save_checkpoint(random_encoder(tiny_encoder_config(), seed=7), tmp_path / "other")  # same shapes
    with pytest.raises(WrongEncoder, match="vision weights differ"):
        _engine(client, llm_dir, encoder_checkpoint=str(other))
