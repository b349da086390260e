"""Errors that map to gRPC status codes (`wire.status`), each with a reason a client can act on (the
ErrorInfo `reason` of the status details): what is the caller's fault, what is worth a retry.

| error            | status             | reason            | retried (`client.retry`)          |
|------------------|--------------------|-------------------|-----------------------------------|
| InvalidInput     | INVALID_ARGUMENT   | BAD_ITEM / BAD_REQUEST | never                        |
| PoisonInput      | INVALID_ARGUMENT   | POISON            | never (it killed a worker twice)  |
| BudgetExceeded   | RESOURCE_EXHAUSTED | REQUEST_TOO_LARGE | never                             |
| CacheMiss        | NOT_FOUND          | CACHE_MISS        | sent again with the media         |
| Busy             | UNAVAILABLE        | BUSY              | yes, after `retry-after-ms`       |
| Unavailable      | UNAVAILABLE        | UNAVAILABLE       | yes, on another replica           |
| DeadlineExceeded | DEADLINE_EXCEEDED  | DEADLINE          | yes while the call's budget lasts |
| Unauthenticated  | UNAUTHENTICATED    | UNAUTHENTICATED   | never                             |
| FailedPrecondition | FAILED_PRECONDITION | CACHE_OFF      | never                             |
| anything else    | INTERNAL           | INTERNAL          | never                             |
"""

from __future__ import annotations

import re


class ItemError(ValueError):
    """A request error that may belong to one item: `item_index` / `item_id` name it, so a client in
    any language can tell which item of a batch failed (sent as a google.rpc.BadRequest field
    violation on `items[i]` next to the message)."""

    def __init__(self, message: str, item_index: int | None = None, item_id: str = ""):
        super().__init__(message)
        self.message, self.item_index, self.item_id = message, item_index, item_id

    def for_item(self, index: int, item_id: str = "") -> "ItemError":
        """The same error, attributed to item `index` (kept if already attributed)."""
        if self.item_index is not None:
            return self
        named = f"item {index}" + (f" ({item_id!r})" if item_id else "")
        return type(self)(f"{named}: {self.message}", index, item_id)

    def __str__(self) -> str:
        return self.message


class InvalidInput(ItemError):
    """Malformed request (corrupt image, zero size, unknown modality, too many items) -> INVALID_ARGUMENT."""


class PoisonInput(InvalidInput):
    """An item that crashed the preprocessing worker decoding it, twice -> INVALID_ARGUMENT (reason POISON):
    deterministic on that input, so no replica should be made to try it again."""


class BudgetExceeded(ItemError):
    """Well-formed but larger than this server accepts (token/pixel/byte budgets) -> RESOURCE_EXHAUSTED."""


class CacheMiss(ItemError):
    """Items sent by digest alone whose rows this server does not hold -> NOT_FOUND (reason CACHE_MISS):
    the client sends those items again with their media."""

    def __init__(self, missing: list[tuple[int, str]]):
        indices = ", ".join(str(i) for i, _ in missing)
        super().__init__(f"{len(missing)} item(s) sent by digest are not cached here (items {indices}); "
                         f"send them with their media", missing[0][0], missing[0][1])
        self.missing = missing

    def for_item(self, index: int, item_id: str = "") -> "CacheMiss":
        return self


class FailedPrecondition(RuntimeError):
    """The endpoint cannot do what the request asks as it is configured (ROWS_CACHE_ONLY with the cache off)
    -> FAILED_PRECONDITION (reason CACHE_OFF)."""


class Unauthenticated(PermissionError):
    """No valid credentials for this call (a missing, wrong or duplicated bearer token; a handle call that
    names no tenant on a deployment that requires one) -> UNAUTHENTICATED."""


class DeadlineExceeded(TimeoutError):
    """The caller's deadline passed before the work finished -> DEADLINE_EXCEEDED."""


class Unavailable(RuntimeError):
    """The server cannot take or finish the work right now (shutting down, a worker died) -> UNAVAILABLE:
    a retry, on this replica or another, may succeed."""


class Busy(Unavailable):
    """Admission control turned the call away (requests or request bytes in flight over the limits) ->
    UNAVAILABLE with a `retry-after-ms` hint: retry later or on another replica."""

    def __init__(self, message: str, retry_after_ms: int):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class EncodeFailed(Exception):
    """A failed Encode crossing a process boundary, as data: the gRPC status code name, a message,
    and the failing item's index/id when one item caused it, so a caller maps it exactly as it
    would the gRPC status."""

    def __init__(self, code: str, message: str, item_index: int | None = None, item_id: str = "",
                 missing: list[tuple[int, str]] | None = None, retry_after_ms: int | None = None, reason: str = ""):
        super().__init__(code, message)
        self.code, self.message, self.item_index, self.item_id = code, message, item_index, item_id
        self.missing = missing or []  # CACHE_MISS: (index, item_id) of every item to send with its media
        self.retry_after_ms = retry_after_ms  # a busy server's hint
        self.reason = reason  # the ErrorInfo reason (`wire.status.reason_for`)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
_PATH = re.compile(r"(?<![\w.])/(?:[\w.+-]+/)+[\w.+-]*")


def clean_message(message: str) -> str:
    """A message fit for a remote caller: no object reprs, no server file paths, one line."""
    message = _PATH.sub("<path>", _REPR.sub("<object>", message))
    return " ".join(message.split())[:1000]
