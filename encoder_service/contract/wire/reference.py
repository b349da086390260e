"""RowsReference <-> protobuf."""

from __future__ import annotations

from encoder_service.contract.reference import RowsReference, Segment
from encoder_service.proto import encoder_pb2 as pb


def _segment(s: Segment) -> pb.MemorySegment:
    return pb.MemorySegment(address=s[0], length=s[1], device=s[2])


def reference_to_proto(ref: RowsReference) -> pb.RowsReference:
    return pb.RowsReference(agent=ref.agent, agent_metadata=ref.agent_metadata, memory=ref.memory,
                            segments=[_segment(s) for s in ref.segments], lease_id=ref.lease_id,
                            expires_unix_ms=ref.expires_unix_ms, check=_segment(ref.check),
                            check_word=ref.check_word)


def reference_from_proto(msg: pb.RowsReference) -> RowsReference:
    return RowsReference(msg.agent, msg.agent_metadata, msg.memory,
                         [(s.address, s.length, s.device) for s in msg.segments], msg.lease_id,
                         msg.expires_unix_ms, (msg.check.address, msg.check.length, msg.check.device),
                         msg.check_word)
