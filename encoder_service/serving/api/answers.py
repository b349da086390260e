"""How an answer leaves the transport process with its rows, for every door (standalone gRPC, Serve's
gRPC proxy, the Serve handle): inline (the serialised EncodeResponse; the handle's header and array), or
by reference under a lease (`leases`) when the request asked for that and the endpoint can.

A request asking for its rows by reference where NIXL is off, or over its tenant's lease budget, gets them
inline: the answer's `rows` says which (counted in `by_reference_inline`)."""

from __future__ import annotations

import numpy as np

from encoder_service.contract.wire.reference import reference_to_proto
from encoder_service.contract.wire.responses import response_bytes
from encoder_service.proto import encoder_pb2 as pb
from encoder_service.serving.api.leases import RowLeases
from encoder_service.serving.host.model_process import SharedReply


def _inline_header(reply: SharedReply) -> pb.EncodeResponse:
    header = pb.EncodeResponse.FromString(reply.header)
    if header.rows == pb.ROWS_BY_REFERENCE:  # answered inline after all: the rows are in the answer
        header.rows = pb.ROWS_INLINE
        header.embeddings.shape[0] = reply.rows
    return header


class Answers:
    def __init__(self, leases: RowLeases | None = None):
        self.leases = leases
        self.by_reference_inline = 0  # by-reference requests answered inline

    def by_reference(self, reply: SharedReply, tenant: str) -> bytes | None:
        """The serialised answer by reference when the request asked for it and a lease was granted: the
        reply is the lease's from then on (the caller must not release it). None: answer inline."""
        header = pb.EncodeResponse.FromString(reply.header)
        if header.rows != pb.ROWS_BY_REFERENCE:
            return None
        reference = self.leases.grant(reply, tenant) if self.leases is not None else None
        if reference is None:
            self.by_reference_inline += 1
            return None
        header.reference.CopyFrom(reference_to_proto(reference))
        return header.SerializeToString()

    @staticmethod
    def inline_bytes(reply: SharedReply) -> bytes:
        """The whole serialised EncodeResponse with its rows (one GIL-free copy out of the arenas)."""
        return response_bytes(_inline_header(reply), reply.segments)

    @staticmethod
    def inline_parts(reply: SharedReply) -> tuple[bytes, np.ndarray]:
        """The Serve handle's form: the header and a copy of the rows of its own (the arenas' rows go back
        before Ray serialises the answer)."""
        return _inline_header(reply).SerializeToString(), reply.gather().numpy()
