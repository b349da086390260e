"""Errors that map to gRPC status codes: the caller's fault, not the server's."""


class InvalidInput(ValueError):
    """Malformed request (corrupt image, zero size, unknown modality, too many items) -> INVALID_ARGUMENT."""


class BudgetExceeded(ValueError):
    """Well-formed but larger than this server accepts (token budget) -> RESOURCE_EXHAUSTED."""


class DeadlineExceeded(TimeoutError):
    """The caller's deadline passed before the work finished -> DEADLINE_EXCEEDED."""


class Unavailable(RuntimeError):
    """The server cannot take or finish the work right now (shutting down, a worker died) -> UNAVAILABLE:
    a retry, on this replica or another, may succeed."""


class EncodeFailed(Exception):
    """A failed Encode on the Ray-native path, as data: the gRPC status code name and a message,
    so a caller maps it exactly as it would the gRPC status."""

    def __init__(self, code: str, message: str):
        super().__init__(code, message)
        self.code, self.message = code, message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
