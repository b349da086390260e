"""Failures as gRPC statuses, the same on every transport: the code, a message fit for a remote caller,
and the standard rich-error details (google.rpc.Status in `grpc-status-details-bin`): a BadRequest field
violation on `items[i]` for each item a failure concerns and an ErrorInfo (reason BAD_ITEM, or
CACHE_MISS with `missing_items`), so a client in any language can tell which item failed."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from encoder_service.contract.errors import (
    BudgetExceeded,
    CacheMiss,
    DeadlineExceeded,
    EncodeFailed,
    InvalidInput,
    Unavailable,
    clean_message,
)

STATUS_DETAILS_KEY = "grpc-status-details-bin"
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
    return grpc.StatusCode.INTERNAL


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
    """Any failure as data that crosses a process boundary and maps back to the same status."""
    if isinstance(error, EncodeFailed):
        return error
    index, item_id = failing_item(error) or (None, "")
    return EncodeFailed(status_for(error).name, status_message(error), index, item_id, missing_items(error),
                        getattr(error, "retry_after_ms", None))


def status_trailers(error: BaseException) -> tuple[tuple[str, str | bytes], ...]:
    """Trailing metadata for a failure: `retry-after-ms` when the server was busy, and the google.rpc.Status
    details described above when the failure concerns items."""
    retry_after = getattr(error, "retry_after_ms", None)
    hint = (("retry-after-ms", str(retry_after)),) if retry_after is not None else ()
    item = failing_item(error)
    if item is None:
        return hint
    index, item_id = item
    missing = missing_items(error)
    named = missing or [item]
    details = any_pb2.Any()
    details.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(
            field=f"items[{i}]", description="sent by digest, not cached here" if missing else status_message(error))
        for i, _ in named]))
    metadata = {"item_index": str(index), "item_id": item_id}
    if missing:
        metadata["missing_items"] = ",".join(str(i) for i, _ in missing)
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="CACHE_MISS" if missing else "BAD_ITEM", domain=DOMAIN,
                                          metadata=metadata))
    status = status_pb2.Status(code=status_for(error).value[0], message=status_message(error), details=[details, info])
    return hint + ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """Client side: the ErrorInfo of a failure's status details, if it carries one."""
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    return None


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
