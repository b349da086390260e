"""Unit level: prompt layout, chunk slicing, and the cache's LRU/pinning rules."""

import random

import pytest
import torch

from encoder_service.processor import MediaInput, Modality
from llm_worker.mm_cache import EmbeddingCache, content_hash
from llm_worker.multimodal import EmbeddingCountMismatch, check_frame_layout, merge_chunk
from llm_worker.prompt import layout_prompt
from llm_worker.tokenizer import ByteTokenizer


def test_layout_expands_markers_with_frames():
    tok = ByteTokenizer()
    layout = layout_prompt("a<image>b<video>c", [[5], [2, 3]], tok)
    ids = layout.token_ids
    image, video = layout.spans
    assert image.length == 5 and len(image.runs) == 1
    assert [r.length for r in video.runs] == [2, 3] and video.length == 5
    for span in layout.spans:
        for run in span.runs:
            assert ids[run.offset - 1] == tok.IMG_START and ids[run.offset + run.length] == tok.IMG_END
            assert set(ids[run.offset : run.offset + run.length]) == {tok.IMG_CONTEXT}
    assert tok.decode(ids) == "a<img></img>b<img></img><img></img>c"
    assert layout.markers == ["image", "video"]


@pytest.mark.parametrize("seed", range(5))
def test_merging_chunk_by_chunk_equals_placing_whole(seed):
    rng = random.Random(seed)
    runs = [[rng.randint(1, 30)] for _ in range(3)] + [[rng.randint(1, 9) for _ in range(4)]]
    layout = layout_prompt("x<image>yy<image><image>z<video>end", runs, ByteTokenizer())
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
    layout = layout_prompt("<image>", [[4]], ByteTokenizer())
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
    assert content_hash(a) == content_hash(MediaInput(Modality.IMAGE, b"\x01\x02"))
    assert content_hash(a) != content_hash(MediaInput(Modality.IMAGE, b"\x01\x03"))
    assert content_hash(MediaInput(Modality.VIDEO, [b"\x01\x02"])) != content_hash(a)


def test_video_frames_must_match_encoder_counts_not_just_the_total():
    layout = layout_prompt("<video>", [[4, 4, 4]], ByteTokenizer())
    check_frame_layout(layout.spans[0], [4, 4, 4])
    with pytest.raises(EmbeddingCountMismatch, match=r"per frame \[4, 4, 4\].*\[6, 4, 2\]"):
        check_frame_layout(layout.spans[0], [6, 4, 2])  # same total (EVS-like pruning), other split
