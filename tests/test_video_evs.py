"""Video: EVS against an independent reimplementation of the published rule, and real video files
(MP4 built here with PyAV) through the real gRPC server, pruned and not, mixed with images."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import torch

from encoder_service.client.endpoint import EncoderClient
from encoder_service.contract.media import MediaInput, Modality, VideoSampling
from encoder_service.contract.tokens import retained_token_count
from encoder_service.video.evs import retention_mask
from tests.conftest import image_bytes
from tests.video_fixture import mp4_bytes

av = pytest.importorskip("av")  # real video files throughout (the GPU machine has no PyAV)


def reference_mask(emb: torch.Tensor, q: float) -> list[list[bool]]:
    """The published rule, written plainly: per-token scores, a stable sort by (-score, flat index)."""
    t, n, _ = emb.shape
    keep = max(n, int((n * t) * (1.0 - q)))
    scores = []
    for f in range(t):
        for p in range(n):
            if f == 0:
                s = torch.tensor(255, dtype=emb.dtype)
            else:
                s = 1 - torch.nn.functional.cosine_similarity(emb[f, p][None], emb[f - 1, p][None], dim=-1)[0]
            scores.append((s.item(), f * n + p))
    ranked = sorted(scores, key=lambda sc: -sc[0])  # Python's sort is stable: ties keep flat order
    kept = {idx for _, idx in ranked[:keep]}
    return [[f * n + p in kept for p in range(n)] for f in range(t)]


def test_retained_counts_follow_the_published_formula():
    assert retained_token_count(10, 100, 0.9) == 99  # int(1000 * 0.09999999999999998)
    assert retained_token_count(100, 10, 0.9) == 100  # never below one frame
    assert retained_token_count(256, 16, 0.75) == 1024
    assert retained_token_count(256, 16, 0.0) == 4096
    with pytest.raises(ValueError):
        retained_token_count(256, 16, 1.0)


def test_published_test_vector():
    emb = torch.tensor([[[1.0, 0], [0, 1]], [[1, 0], [1, 0]], [[-1, 0], [1, 1]]])
    assert retention_mask(emb, 0.4).tolist() == [[True, True], [False, False], [True, False]]


@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_matches_the_reference_on_random_embeddings(q, dtype):
    gen = torch.Generator().manual_seed(int(q * 100) + (dtype == torch.bfloat16))
    emb = torch.randn(6, 9, 16, generator=gen).to(dtype)
    emb[3] = emb[2]  # a static frame: its tokens score 0 and tie
    mask = retention_mask(emb, q)
    assert mask.tolist() == reference_mask(emb, q)
    assert mask.sum().item() == retained_token_count(9, 6, q)
    assert mask[0].all()  # frame 0 always whole


def test_edge_cases_one_frame_identical_frames_and_empty_frames():
    one = torch.randn(1, 5, 8)
    assert retention_mask(one, 0.9).all()
    static = torch.eye(8)[:4].expand(5, 4, 8).contiguous()  # unit vectors: every later token scores exactly 0
    mask = retention_mask(static, 0.5)  # ties everywhere: earlier frames win, whole
    assert mask.tolist() == reference_mask(static, 0.5)
    assert mask.sum(1).tolist() == [4, 4, 2, 0, 0]  # K = 10: frames 3 and 4 keep nothing


# ---------------------------------------------------------------- real video files through gRPC


def decoded_frames(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


@pytest.fixture(scope="module")
def clip() -> bytes:
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    frames = np.stack([np.roll(base, 4 * (i // 3), axis=1) for i in range(20)])  # moves every 3 frames
    return mp4_bytes(frames)


def test_mp4_round_trips_through_grpc_pruned_and_not_mixed_with_images(encoder_server, engine, clip):
    frames = decoded_frames(clip)
    sampling = VideoSampling(num_frames=5)
    items = [
        MediaInput(Modality.IMAGE, image_bytes(100, 60, seed=1), item_id="img"),
        MediaInput(Modality.VIDEO, clip, item_id="pruned", sampling=sampling, pruning_rate=0.6),
        MediaInput(Modality.VIDEO, clip, item_id="whole", sampling=sampling),
    ]
    with EncoderClient(encoder_server.address) as client:
        result = client.encode(items)
    img, pruned, whole = result.items
    n = engine.tiling.tokens_per_tile
    assert whole.token_count == 5 * n and whole.tokens_per_frame == [n] * 5
    assert pruned.token_count == retained_token_count(n, 5, 0.6) == sum(pruned.tokens_per_frame)
    assert pruned.tokens_per_frame[0] == n
    # 5 of 20 frames (2 s at 10 fps), vLLM's rule: linspace(0, 19, 5) as ints -> 0, 4, 9, 14, 19
    assert whole.frame_indices == [0, 4, 9, 14, 19] and whole.video_fps == 10.0
    assert whole.frame_timestamps == pytest.approx([0.0, 0.4, 0.9, 1.4, 1.9])
    # The same frames given as pixels, encoded unpruned, then EVS by the reference rule: the same rows.
    picked = np.stack([frames[i] for i in (0, 4, 9, 14, 19)])
    reference = engine.encode([MediaInput(Modality.VIDEO, picked)]).embeddings
    rows = result.split()
    torch.testing.assert_close(rows[2], reference, rtol=0, atol=0)
    keep = torch.tensor(reference_mask(reference.view(5, n, -1), 0.6)).flatten()
    torch.testing.assert_close(rows[1], reference[keep], rtol=0, atol=0)
    assert rows[0].shape[0] == img.token_count


def test_bad_videos_get_invalid_argument_and_the_server_keeps_serving(encoder_server, clip):
    with EncoderClient(encoder_server.address) as client:
        for data, kwargs, message in [
            (b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64, {}, "unreadable video"),
            (clip, {"sampling": VideoSampling(num_frames=10_000)}, "more than the limit"),
            (clip, {"pruning_rate": 1.0}, "pruning rate"),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                client.encode([MediaInput(Modality.VIDEO, data, **kwargs)])
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in e.value.details()
        ok = client.encode([MediaInput(Modality.VIDEO, clip, sampling=VideoSampling(fps=2.0))])
        assert ok.items[0].num_tiles == 4  # 2 s at 2 fps
