"""gRPC channel and server settings shared by every endpoint and client of the pool."""

from __future__ import annotations

# A 13-tile image of a 4096-wide LLM in bf16 is ~27 MB: far past gRPC's 4 MB default.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                    max_receive_bytes: int | None = None) -> list[tuple[str, int]]:
    """gRPC settings for messages of tens of MB, on both server and client: raised size limits
    (a server receives less than it sends: `max_receive_bytes`), HTTP/2 frames up to 16 MB and a
    64 MB read-ahead, so a response is not trickled through the 16 KB frame / 64 KB window defaults.
    Clients reconnect within a few seconds of a server coming back (gRPC's default backoff grows to
    two minutes: a pool replica restarting on its address would stay unreachable that long)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_receive_bytes or max_message_bytes),
        ("grpc.http2.max_frame_size", (1 << 24) - 1),
        ("grpc.http2.lookahead_bytes", 64 << 20),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]
