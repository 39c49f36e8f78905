"""The error types every layer raises; each maps to one gRPC status and one CLI line."""
from __future__ import annotations


class SpecmeshError(Exception):
    """Base: a problem the user can fix, reported as one line (no traceback)."""

    grpc_code_name = "INTERNAL"


class InvalidRequest(SpecmeshError, ValueError):
    """Bad request parameters (empty prompt, max_tokens <= 0, temperature < 0, ...)."""

    grpc_code_name = "INVALID_ARGUMENT"


class ModelError(SpecmeshError):
    """A model could not be found, assembled, converted or loaded, or a pair does not fit together."""

    grpc_code_name = "FAILED_PRECONDITION"


class ResourceExhausted(SpecmeshError):
    """No KV memory left for a new session (admission refused)."""

    grpc_code_name = "RESOURCE_EXHAUSTED"


class ServiceUnavailable(SpecmeshError):
    """A peer service is down or unreachable."""

    grpc_code_name = "UNAVAILABLE"


class PermissionDenied(SpecmeshError):
    """The caller may not do this (another API key's request)."""

    grpc_code_name = "PERMISSION_DENIED"


class NotFound(SpecmeshError):
    """A session (or other named object) that does not exist or was already closed."""

    grpc_code_name = "NOT_FOUND"


class SessionClosed(SpecmeshError):
    """The session was ended (Abort / CloseSession) before its open arrived: the open is refused."""

    grpc_code_name = "ABORTED"
