"""Errors that map to gRPC status codes: the caller's fault, not the server's."""


class InvalidInput(ValueError):
    """Malformed request (corrupt image, zero size, unknown modality, too many items) -> INVALID_ARGUMENT."""


class BudgetExceeded(ValueError):
    """Well-formed but larger than this server accepts (token budget) -> RESOURCE_EXHAUSTED."""


class DeadlineExceeded(TimeoutError):
    """The caller's deadline passed before the work finished -> DEADLINE_EXCEEDED."""
