"""EncodeStream over real gRPC: items arrive as they are ready and reassemble, bit for bit, into what
Encode returns; failures end the stream with Encode's status; a stream cut short is never taken for a
whole one; the rows every streamed item held go back, whatever happened to the call."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from encoder_service.client.endpoint import ENCODE_STREAM_METHOD, EncoderClient
from encoder_service.client.pool import PoolClientConfig, PoolEncoderClient
from encoder_service.contract.media import MediaInput, Modality, VideoSampling
from encoder_service.contract.wire.media import media_to_proto
from encoder_service.contract.wire.status import item_from_status
from encoder_service.contract.wire.streams import (
    IncompleteStream,
    StreamAssembler,
    end_message,
    item_messages,
    parse_message,
    start_message,
)
from encoder_service.contract.wire.tensors import TORCH_TO_PB
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.serving.api.server import BackgroundServer, ServerConfig
from encoder_service.serving.host.pipeline import PipelineConfig
from tests.conftest import image_bytes, wait_for
from tests.test_model_process import _wait_until_returned
from tests.video_fixture import av, mp4_bytes


@pytest.fixture(scope="module")
def server(engine_config):
    """Small chunks (16 KiB): every item of a few tiles streams as several messages."""
    cfg = ServerConfig(port=0, engine=engine_config, stream_chunk_bytes=16 << 10,
                       pipeline=PipelineConfig(preprocess_workers=2, cache_mb=0))
    with BackgroundServer(cfg) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with EncoderClient(server.address, timeout=60) as c:
        yield c


def _mixed_items(rng) -> list[MediaInput]:
    frames = rng.integers(0, 256, (6, 48, 64, 3), dtype=np.uint8)
    image = MediaInput(Modality.IMAGE, image_bytes(300, 200, seed=int(rng.integers(1 << 30))), item_id="big")
    clip = (MediaInput(Modality.VIDEO, mp4_bytes(frames), item_id="clip", sampling=VideoSampling(num_frames=4))
            if av is not None else MediaInput(Modality.VIDEO, frames[:4], item_id="clip"))  # no PyAV: decoded frames
    return [
        image,
        MediaInput(Modality.IMAGE, image_bytes(64, 48, seed=int(rng.integers(1 << 30))), item_id="small"),
        clip,
        MediaInput(Modality.VIDEO, frames, item_id="pruned", pruning_rate=0.5),
        dataclasses.replace(image, item_id="big again"),  # the same item twice: encoded once, sent twice
    ]


def _without_hits(items):
    return [dataclasses.replace(i, cache_hit=False) for i in items]


def test_streamed_items_reassemble_bit_for_bit_into_encodes_answer(client):
    rng = np.random.default_rng()
    items = _mixed_items(rng)
    arrived = {}
    streamed = client.encode_stream(items, lambda i, item, rows, model: arrived.setdefault(i, (item, rows.clone(), model)))
    unary = client.encode(items)
    assert torch.equal(streamed.embeddings, unary.embeddings)
    assert _without_hits(streamed.items) == _without_hits(unary.items)
    assert streamed.extras["model"] == unary.extras["model"]
    assert sorted(arrived) == list(range(len(items)))  # every item announced once, rows as in the result
    for i, (item, rows, model) in arrived.items():
        assert item == streamed.items[i] and torch.equal(rows, streamed.split()[i])
        assert model == unary.extras["model"]


def test_the_stream_is_start_items_in_chunks_end(client):
    rng = np.random.default_rng()
    request = pb.EncodeRequest(request_id="r1", items=[media_to_proto(i) for i in _mixed_items(rng)[:3]])
    call = client.channel.unary_stream(ENCODE_STREAM_METHOD, request_serializer=pb.EncodeRequest.SerializeToString,
                                       response_deserializer=pb.EncodeStreamResponse.FromString)
    messages = list(call(request, timeout=60))
    parts = [m.WhichOneof("part") for m in messages]
    assert parts[0] == "start" and parts[-1] == "end" and set(parts[1:-1]) == {"rows"}
    assert messages[0].start.request_id == "r1" and len(messages[0].start.token_counts) == 3
    chunks = [m.rows for m in messages[1:-1]]
    assert len(chunks) > 3  # 16 KiB chunks: the 300x200 image (7 tiles) alone is several
    for index in range(3):  # an item's chunks are consecutive, the first with its metadata
        mine = [k for k, c in enumerate(chunks) if c.item_index == index]
        assert mine == list(range(mine[0], mine[-1] + 1))
        assert chunks[mine[0]].HasField("item") and not any(chunks[k].HasField("item") for k in mine[1:])
    assembler = StreamAssembler()
    for m in messages:
        assembler.add(m)
    whole = assembler.result()
    # Cut anywhere before the end, or with a chunk lost or repeated: refused, never short.
    for broken in (messages[:-1], messages[:len(messages) // 2], messages[:2] + messages[3:],
                   messages[:3] + messages[2:]):
        with pytest.raises(IncompleteStream):
            assembler = StreamAssembler()
            for m in broken:
                assembler.add(m)
            assembler.result()
    assert whole.embeddings.shape[0] == sum(messages[0].start.token_counts)


def test_stream_messages_are_read_with_their_rows_in_place(client):
    """The client parses each message as it arrived (bytes): the rows are a view of those bytes, never copied
    through protobuf, and everything else is what the generated parser reads."""
    rng = np.random.default_rng()
    request = pb.EncodeRequest(request_id="r2", items=[media_to_proto(i) for i in _mixed_items(rng)[:2]])
    raw = list(client.channel.unary_stream(ENCODE_STREAM_METHOD, request_serializer=pb.EncodeRequest.SerializeToString)(
        request, timeout=60))
    assert all(isinstance(m, bytes) for m in raw)
    for data in raw:
        msg, rows = parse_message(data)
        reference = pb.EncodeStreamResponse.FromString(data)
        if reference.WhichOneof("part") != "rows":
            assert msg == reference and rows is None
            continue
        assert rows.obj is data and bytes(rows) == reference.rows.data  # a view of the received message
        reference.rows.ClearField("data")
        assert msg == reference
    # Valid but unusual encodings (the data field first, or given twice: protobuf keeps the last) parse
    # as the generated parser reads them.
    head = pb.ItemRows(item_index=1, row_start=3, row_count=2)
    data_first = pb.ItemRows(data=b"ab").SerializeToString() + head.SerializeToString()
    twice = pb.ItemRows(data=b"xy").SerializeToString() + data_first
    for inner in (data_first, twice):
        msg, rows = parse_message(b"\x12" + bytes([len(inner)]) + inner)  # field 2 (rows), its length, itself
        assert (msg.rows.data if rows is None else bytes(rows)) == b"ab"
        assert (msg.rows.item_index, msg.rows.row_start, msg.rows.row_count) == (1, 3, 2)


def test_without_copy_a_one_message_answer_stays_in_its_message(client):
    """copy=False, as Encode's: an answer whose rows all came in one message is a view of that message (no
    copy into fresh memory); an answer in several messages is assembled as with copy=True."""
    rng = np.random.default_rng()
    hidden, dtype = 24, torch.float32
    rows = torch.randn(5, hidden, dtype=dtype)
    meta = pb.ItemMetadata(item_id="a", offset=0, token_count=5).SerializeToString()
    end = pb.EncodeResponse(request_id="r", items=[pb.ItemMetadata.FromString(meta)],
                            embeddings=pb.Tensor(dtype=TORCH_TO_PB[dtype], shape=[5, hidden])).SerializeToString()
    flat = rows.view(-1).view(torch.uint8)
    for chunk_bytes, in_place in ((1 << 20, True), (2 * hidden * 4, False)):  # one message; three
        messages = [start_message("r", dtype, hidden, [5], "m"), *item_messages(0, meta, flat, hidden * 4, chunk_bytes),
                    end_message(end)]
        for copy in (True, False):
            assembler = StreamAssembler(copy=copy)
            for data in messages:
                assembler.add(*parse_message(data))
            result = assembler.result()
            assert torch.equal(result.embeddings, rows)
            base = torch.frombuffer(messages[1], dtype=torch.uint8).data_ptr()
            inside = base <= result.embeddings.data_ptr() < base + len(messages[1])
            assert inside == (in_place and not copy)
    # End to end, several items in several messages each: the same answer either way.
    items = _mixed_items(rng)[:2]
    assert torch.equal(client.encode_stream(items, None, copy=False).embeddings, client.encode(items).embeddings)


def test_a_failing_item_ends_the_stream_with_encodes_status(client, server):
    rng = np.random.default_rng()
    truncated = image_bytes(80, 80, "PNG")[:60]  # its header plans; its pixels fail to decode
    items = [MediaInput(Modality.IMAGE, image_bytes(400, 300, seed=int(rng.integers(1 << 30)))),
             MediaInput(Modality.IMAGE, truncated, item_id="broken")]
    arrived = []
    with pytest.raises(grpc.RpcError) as streamed:
        client.encode_stream(items, lambda i, *rest: arrived.append(i))
    with pytest.raises(grpc.RpcError) as unary:
        client.encode(items)
    assert streamed.value.code() == unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert streamed.value.details() == unary.value.details() and "item 1 ('broken')" in streamed.value.details()
    assert item_from_status(streamed.value) == (1, "broken")
    assert 1 not in arrived
    ok = client.encode_stream([MediaInput(Modality.IMAGE, image_bytes(40, 30))], None)  # still serving
    assert ok.embeddings.shape[0] == ok.token_counts[0] > 0
    assert _wait_until_returned(server.server.model) == {"outputs_in_use": 0, "tiles_in_use": 0}


def test_rows_go_back_after_cancelled_and_expired_streams(client, server):
    rng = np.random.default_rng()
    items = [MediaInput(Modality.IMAGE, image_bytes(int(w), int(h))) for w, h in rng.integers(200, 500, (8, 2))]
    request = pb.EncodeRequest(items=[media_to_proto(i) for i in items])
    call = client.channel.unary_stream(ENCODE_STREAM_METHOD, request_serializer=pb.EncodeRequest.SerializeToString,
                                       response_deserializer=pb.EncodeStreamResponse.FromString)
    client.encode(items)  # warm: a first call on a GPU also pays for its kernels' set-up
    started = time.perf_counter()
    unary = client.encode(items)
    too_soon = (time.perf_counter() - started) / 4  # a deadline the server cannot meet, on any machine
    for _ in range(3):  # read the start and the first rows, then hang up
        stream = call(request, timeout=60)
        assert next(stream).WhichOneof("part") == "start"
        next(stream)
        stream.cancel()
    with pytest.raises(grpc.RpcError) as late:
        client.encode_stream(items, None, timeout=too_soon)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.2)
    assert _wait_until_returned(server.server.model) == {"outputs_in_use": 0, "tiles_in_use": 0}
    streamed = client.encode_stream(items, None)
    assert torch.equal(streamed.embeddings, unary.embeddings)


def test_a_request_spread_over_several_connections_answers_as_one(server, client):
    """`connections=3`: the items dealt over three TCP connections, one stream each; the result is the
    request's (items in order, offsets into one tensor, every item announced once by its request
    index), and a failing item is named by its index in the request, status details included."""
    rng = np.random.default_rng()
    items = _mixed_items(rng)
    with EncoderClient(server.address, timeout=60, connections=3) as spread:
        arrived = {}
        result = spread.encode_stream(items, lambda i, item, rows, model: arrived.setdefault(i, rows.clone()))
        one = client.encode(items)
        assert result.token_counts == one.token_counts and _without_hits(result.items) == _without_hits(one.items)
        torch.testing.assert_close(result.embeddings, one.embeddings, rtol=1e-5, atol=1e-5)
        assert sorted(arrived) == list(range(len(items)))
        assert all(torch.equal(arrived[i], rows) for i, rows in enumerate(result.split()))
        broken = items[:4] + [MediaInput(Modality.IMAGE, image_bytes(80, 80, "PNG")[:60], item_id="broken")]
        with pytest.raises(grpc.RpcError) as err:  # item 4 rides the second connection as its item 1
            spread.encode_stream(broken, None)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "item 4 ('broken')" in err.value.details() and item_from_status(err.value) == (4, "broken")


def _connections_to(port: int) -> int:
    """Established TCP connections on this host whose far end is `port` (Linux: /proc/net/tcp, tcp6)."""
    count = 0
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for line in (table.read_text().splitlines()[1:] if table.exists() else []):
            fields = line.split()
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="counts connections through Linux's /proc")
def test_the_pool_client_spreads_its_calls_over_its_connections(server, client):
    """PoolClientConfig(connections=2): the LLM worker's client opens two TCP connections to the address, and
    both its modes answer as one call would (per-item calls with affinity, one dealt stream without)."""
    rng = np.random.default_rng()
    items = _mixed_items(rng)[:3]
    port = int(server.address.rsplit(":", 1)[1])
    one = client.encode(items)
    before = _connections_to(port)
    for affinity in (True, False):
        pool = PoolEncoderClient(PoolClientConfig([server.address], application="", connections=2, affinity=affinity,
                                                  probe=False))
        try:
            for result in (pool.encode(items), pool.encode_stream(items, lambda *event: None)):
                assert result.token_counts == one.token_counts
                torch.testing.assert_close(result.embeddings, one.embeddings, rtol=1e-5, atol=1e-5)
            assert _connections_to(port) == before + 2
        finally:
            pool.close()
        assert wait_for(lambda: _connections_to(port) == before, timeout_s=10)  # closed with the client
