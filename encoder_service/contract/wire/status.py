"""Failures as gRPC statuses, the same on every transport: the code, a message fit for a remote caller,
and the standard rich-error details in `grpc-status-details-bin` (a google.rpc.Status): an ErrorInfo
(domain `encoder_service`) whose `reason` says what kind of failure it is (`contract.errors` has the
table) and, when the failure concerns items, a BadRequest field violation on `items[i]` for each and
`item_index` / `item_id` / `missing_items` in the ErrorInfo's metadata, so a client in any language can
tell which item failed. A busy server also sends `retry-after-ms`.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from encoder_service.contract.errors import (BudgetExceeded, Busy, CacheMiss, DeadlineExceeded, EncodeFailed,
                                             FailedPrecondition, InvalidInput, PoisonInput, Unauthenticated,
                                             Unavailable, clean_message)

STATUS_DETAILS_KEY = "grpc-status-details-bin"
RETRY_AFTER_KEY = "retry-after-ms"
DOMAIN = "encoder_service"


def status_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC status an Encode failure maps to."""
    if isinstance(error, EncodeFailed):  # already mapped, in another process
        return grpc.StatusCode[error.code]
    if isinstance(error, CacheMiss):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, BudgetExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(error, Unavailable):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(error, FailedPrecondition):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


def reason_for(error: BaseException) -> str:
    """The ErrorInfo reason of a failure (what a client acts on: see `contract.errors`)."""
    if isinstance(error, EncodeFailed):
        return error.reason or status_for(error).name
    if isinstance(error, CacheMiss):
        return "CACHE_MISS"
    if isinstance(error, PoisonInput):
        return "POISON"
    if isinstance(error, InvalidInput):
        return "BAD_ITEM" if error.item_index is not None else "BAD_REQUEST"
    if isinstance(error, BudgetExceeded):
        return "REQUEST_TOO_LARGE"
    if isinstance(error, Busy):
        return "BUSY"
    if isinstance(error, DeadlineExceeded):
        return "DEADLINE"
    if isinstance(error, FailedPrecondition):
        return "CACHE_OFF"
    return status_for(error).name  # UNAVAILABLE, UNAUTHENTICATED, INTERNAL


def status_message(error: BaseException) -> str:
    """The status details for a failure: the caller's errors say what was wrong (no reprs, no server
    paths); internal ones say only that, the traceback stays in the log."""
    if isinstance(error, EncodeFailed):
        return error.message
    if status_for(error) == grpc.StatusCode.INTERNAL:
        return "internal error in the encoder (logged on the server)"
    return clean_message(str(error))


def failing_item(error: BaseException) -> tuple[int, str] | None:
    """(index, item_id) of the item a failure belongs to, if one item caused it."""
    index = getattr(error, "item_index", None)
    return None if index is None else (index, getattr(error, "item_id", ""))


def missing_items(error: BaseException) -> list[tuple[int, str]]:
    """(index, item_id) of the items a CACHE_MISS asks the caller to send with their media."""
    return list(getattr(error, "missing", None) or [])


def as_failure(error: BaseException) -> EncodeFailed:
    """Any failure as data that crosses a process boundary and maps back to the same status and details."""
    if isinstance(error, EncodeFailed):
        return error
    index, item_id = failing_item(error) or (None, "")
    return EncodeFailed(status_for(error).name, status_message(error), index, item_id, missing_items(error),
                        getattr(error, "retry_after_ms", None), reason_for(error))


def status_trailers(error: BaseException) -> tuple[tuple[str, str | bytes], ...]:
    """Trailing metadata for a failure: `retry-after-ms` when the server was busy, and the google.rpc.Status
    details described above."""
    retry_after = getattr(error, "retry_after_ms", None)
    hint = ((RETRY_AFTER_KEY, str(retry_after)),) if retry_after is not None else ()
    metadata, details = {}, []
    item = failing_item(error)
    missing = missing_items(error)
    if item is not None:
        metadata = {"item_index": str(item[0]), "item_id": item[1]}
        named = missing or [item]
        violations = any_pb2.Any()
        violations.Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=f"items[{i}]", description="sent by digest, not cached here" if missing else status_message(error))
            for i, _ in named]))
        details.append(violations)
    if missing:
        metadata["missing_items"] = ",".join(str(i) for i, _ in missing)
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason_for(error), domain=DOMAIN, metadata=metadata))
    details.append(info)
    status = status_pb2.Status(code=status_for(error).value[0], message=status_message(error), details=details)
    return hint + ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """Client side: the encoder's ErrorInfo of a failure's status details, if it carries one."""
    for key, value in getattr(error, "trailing_metadata", lambda: ())() or ():
        if key == STATUS_DETAILS_KEY:
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info) and info.domain == DOMAIN:
                    return info
    return None


def failure_from_rpc(error: grpc.RpcError) -> EncodeFailed:
    """Client side: an RpcError's status and details as data (e.g. to raise again, renumbered)."""
    info = error_info(error)
    item = item_from_status(error)
    index, item_id = item if item is not None else (None, "")
    missing = [(i, "") for i in cache_misses_from_status(error) or []]
    hint = retry_after_s(error)
    return EncodeFailed(error.code().name, error.details() or "", index, item_id, missing,
                        int(hint * 1e3) if hint else None, info.reason if info is not None else "")


def item_from_status(error: grpc.RpcError) -> tuple[int, str] | None:
    """Client side: (index, item_id) of the failing item, from the status details, if any."""
    info = error_info(error)
    if info is None or "item_index" not in info.metadata:
        return None
    return int(info.metadata["item_index"]), info.metadata.get("item_id", "")


def cache_misses_from_status(error: grpc.RpcError) -> list[int] | None:
    """Client side: indices of the items to send again with their media, if this is a CACHE_MISS."""
    if error.code() != grpc.StatusCode.NOT_FOUND:
        return None
    info = error_info(error)
    if info is None or info.reason != "CACHE_MISS":
        return None
    return [int(i) for i in info.metadata.get("missing_items", "").split(",") if i]


def retry_after_s(error: grpc.RpcError) -> float:
    """Client side: the server's `retry-after-ms` hint, in seconds (0 when it sent none)."""
    for key, value in getattr(error, "trailing_metadata", lambda: ())() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, float(value) / 1e3)
            except ValueError:
                return 0.0
    return 0.0
