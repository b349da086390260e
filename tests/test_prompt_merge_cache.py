"""Unit level: prompt layout, chunk slicing, and the cache's LRU/pinning rules."""

import random

import pytest
import torch

from encoder_service.client.checks import EmbeddingCountMismatch
from encoder_service.contract.media import MediaInput, Modality
from llm_worker.mm_cache import EmbeddingCache, item_cache_key
from llm_worker.multimodal import merge_chunk, relayout_frames
from llm_worker.prompt import MediaRegion, layout_prompt
from llm_worker.tokenizer import ByteTokenizer


def _regions(runs: list[list[int]], videos: set[int] = frozenset()) -> list[MediaRegion]:
    return [MediaRegion(r, video=i in videos) for i, r in enumerate(runs)]


def test_layout_expands_markers_with_frames():
    tok = ByteTokenizer()
    layout = layout_prompt("a<image>b<video>c", [MediaRegion([5]), MediaRegion([2, 3], [0.0, 1.5], video=True)], tok)
    ids = layout.token_ids
    image, video = layout.spans
    assert image.length == 5 and len(image.runs) == 1
    assert [r.length for r in video.runs] == [2, 3] and video.length == 5
    for span in layout.spans:
        for run in span.runs:
            assert ids[run.offset - 1] == tok.IMG_START and ids[run.offset + run.length] == tok.IMG_END
            assert set(ids[run.offset : run.offset + run.length]) == {tok.IMG_CONTEXT}
    assert tok.decode(ids) == ("a<img></img>bFrame 1 sampled at 0.00 seconds: <img></img>"
                               "\nFrame 2 sampled at 1.50 seconds: <img></img>c")
    assert layout.markers == ["image", "video"]


@pytest.mark.parametrize("seed", range(5))
def test_merging_chunk_by_chunk_equals_placing_whole(seed):
    rng = random.Random(seed)
    runs = [[rng.randint(1, 30)] for _ in range(3)] + [[rng.randint(1, 9) for _ in range(4)]]
    layout = layout_prompt("x<image>yy<image><image>z<video>end", _regions(runs, {3}), ByteTokenizer())
    hidden = 8
    rows = [torch.randn(span.length, hidden) for span in layout.spans]
    expected = torch.zeros(len(layout.token_ids), hidden)
    for span, r in zip(layout.spans, rows):
        expected[span.positions()] = r

    merged, start = torch.zeros_like(expected), 0
    while start < len(layout.token_ids):
        end = min(start + rng.randint(1, 25), len(layout.token_ids))
        merge_chunk(merged[start:end], start, list(zip(layout.spans, rows)))
        start = end
    torch.testing.assert_close(merged, expected, rtol=0, atol=0)


def test_merge_rejects_wrong_row_count_and_width():
    layout = layout_prompt("<image>", _regions([[4]]), ByteTokenizer())
    with pytest.raises(EmbeddingCountMismatch, match="4 placeholders but the encoder returned 5"):
        merge_chunk(torch.zeros(6, 8), 0, [(layout.spans[0], torch.zeros(5, 8))])
    with pytest.raises(EmbeddingCountMismatch, match="width"):
        merge_chunk(torch.zeros(6, 8), 0, [(layout.spans[0], torch.zeros(4, 16))])


def test_cache_lru_pins_and_stats():
    cache = EmbeddingCache(max_bytes=3 * 4 * 10)  # room for three [10] float32 rows
    for key in "abc":
        cache.put(key, torch.zeros(1, 10))
    cache.pin("a")
    assert cache.lookup("b") is not None  # b is now most recent; c is the LRU unpinned
    cache.put("d", torch.zeros(1, 10))
    assert "c" not in cache and {"a", "b", "d"} <= set(cache._entries)
    cache.put("e", torch.zeros(2, 10))  # needs two slots: evicts b and d, never the pinned a
    assert "a" in cache and "e" in cache and "b" not in cache and "d" not in cache
    assert cache.stats.evictions == 3 and cache.stats.hits == 1
    assert cache.lookup("zzz") is None and cache.stats.misses == 1
    cache.unpin("a")
    with pytest.raises(RuntimeError):
        cache.unpin("a")


def test_content_hash_distinguishes_content_and_modality():
    a = MediaInput(Modality.IMAGE, b"\x01\x02")
    assert item_cache_key(a) == item_cache_key(MediaInput(Modality.IMAGE, b"\x01\x02"))
    assert item_cache_key(a) != item_cache_key(MediaInput(Modality.IMAGE, b"\x01\x03"))
    assert item_cache_key(MediaInput(Modality.VIDEO, [b"\x01\x02"])) != item_cache_key(a)


def test_video_frames_must_match_encoder_counts_not_just_the_total():
    layout = layout_prompt("<video>", _regions([[4, 4, 4]], {0}), ByteTokenizer())
    assert relayout_frames(layout, 0, [4, 4, 4], pruned=False) is layout
    with pytest.raises(EmbeddingCountMismatch, match=r"per frame \[4, 4, 4\].*\[6, 4, 2\]"):
        relayout_frames(layout, 0, [6, 4, 2], pruned=False)  # same total, other split: not a pruned video


@pytest.mark.parametrize("seed", range(4))
def test_pruned_video_relayout_keeps_the_region_length_and_moves_nothing_else(seed):
    """[K, 0, ..., 0] before encoding, the real counts after: same length, every other token in place,
    and the rows still land on exactly the placeholders (frames keeping 0 tokens included)."""
    rng = random.Random(seed)
    tok = ByteTokenizer()
    frames = rng.randint(2, 6)
    counts = [rng.randint(0, 5) for _ in range(frames)]
    counts[0] = max(counts[0], 1)
    total = sum(counts)
    times = [0.5 * f for f in range(frames)] if seed % 2 else None
    regions = [MediaRegion([3]), MediaRegion([total] + [0] * (frames - 1), times, video=True), MediaRegion([2])]
    before = layout_prompt("see <image> then <video> and <image>.", regions, tok)
    after = relayout_frames(before, 1, counts, pruned=True)
    assert len(after.token_ids) == len(before.token_ids)
    video = after.spans[1]
    assert video.frame_counts == counts and video.length == total and video.start == before.spans[1].start
    region_end = after.spans[2].start
    assert after.token_ids[: video.start] == before.token_ids[: video.start]
    assert after.token_ids[region_end:] == before.token_ids[region_end:]
    assert after.spans[0] == before.spans[0] and after.spans[2] == before.spans[2]
    text = tok.decode(after.token_ids[video.start : region_end])
    assert text.count("<img>") == text.count("</img>") == frames
    for f in range(frames):
        newline = "\n" if f else ""
        assert (f"{newline}Frame {f + 1} sampled at {0.5 * f:.2f} seconds: " if times else f"{newline}Frame {f + 1}: ") in text
    for run in video.runs:
        assert after.token_ids[run.offset - 1] == tok.IMG_START and after.token_ids[run.offset + run.length] == tok.IMG_END
        assert set(after.token_ids[run.offset : run.offset + run.length]) <= {tok.IMG_CONTEXT}
    rows = torch.randn(total, 4)
    merged = torch.zeros(len(after.token_ids), 4)
    merge_chunk(merged, 0, [(video, rows)])
    torch.testing.assert_close(merged[video.positions()], rows, rtol=0, atol=0)
    with pytest.raises(EmbeddingCountMismatch):
        relayout_frames(before, 1, counts + [0], pruned=True)  # another frame count
    with pytest.raises(EmbeddingCountMismatch):
        relayout_frames(before, 1, [total + 1] + [0] * (frames - 1), pruned=True)  # another total


def test_cache_key_covers_pruning_rate_and_sampling():
    from encoder_service.contract.media import VideoSampling

    video = MediaInput(Modality.VIDEO, b"same container bytes")
    keys = {
        item_cache_key(video),
        item_cache_key(video, 0.5),
        item_cache_key(video, 0.75),
        item_cache_key(MediaInput(Modality.VIDEO, b"same container bytes", sampling=VideoSampling(num_frames=8))),
        item_cache_key(MediaInput(Modality.VIDEO, b"same container bytes", sampling=VideoSampling(fps=2.0))),
    }
    assert len(keys) == 5
    assert item_cache_key(video, 0.5) == item_cache_key(MediaInput(Modality.VIDEO, b"same container bytes"), 0.5)


def test_actor_codec_keeps_every_media_field():
    """The LLM worker actor's msgpack API must not drop a video's sampling or pruning rate (other rows)."""
    import numpy as np

    from encoder_service.contract.media import VideoSampling
    from llm_worker.codec import pack_requests, unpack_requests
    from llm_worker.engine import GenerationRequest

    frames = np.random.default_rng().integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
    media = [
        MediaInput(Modality.VIDEO, b"mp4 bytes", item_id="clip", sampling=VideoSampling(num_frames=8, max_frames=4),
                   pruning_rate=0.75),
        MediaInput(Modality.VIDEO, frames, pruning_rate=0.0),
        MediaInput(Modality.IMAGE, b"png", content_hash="client-claimed"),
    ]
    [back] = unpack_requests(pack_requests([GenerationRequest("<video><video><image>", media, 3, "r1")]))
    assert back.prompt == "<video><video><image>" and back.request_id == "r1" and back.max_new_tokens == 3
    for got, sent in zip(back.media, media):
        assert (got.modality, got.item_id, got.content_hash, got.sampling, got.pruning_rate) == (
            sent.modality, sent.item_id, sent.content_hash, sent.sampling, sent.pruning_rate)
    assert back.media[0].data == b"mp4 bytes" and (back.media[1].data == frames).all()
