"""Errors a request can end in, each with its HTTP status and gRPC status code.

Everything the server raises while answering a request is a :class:`ServerError`; the HTTP and
gRPC front ends turn it into ``{"error": message}`` with :attr:`ServerError.http_status`, or an
aborted RPC with :attr:`ServerError.grpc_code`. ``reason`` labels the failure in ``/metrics``.
"""

from __future__ import annotations

from typing import Any


class ServerError(Exception):
    """A request that cannot be answered; the message says why and names the tensor."""

    http_status = 500
    grpc_code = "INTERNAL"
    reason = "internal"


class InvalidArgument(ServerError):
    """Malformed request or bad tensor (HTTP 400, gRPC INVALID_ARGUMENT)."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    reason = "invalid_argument"


class NotFound(ServerError):
    """Unknown model, version or route (HTTP 404, gRPC NOT_FOUND)."""

    http_status = 404
    grpc_code = "NOT_FOUND"
    reason = "not_found"


class PayloadTooLarge(ServerError):
    """Body over the size limit (HTTP 413, gRPC RESOURCE_EXHAUSTED as gRPC itself answers)."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"
    reason = "too_large"


class QueueFull(ServerError):
    """The model's bounded queue is full; retry later (HTTP 429, gRPC RESOURCE_EXHAUSTED)."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    reason = "overloaded"


class Unavailable(ServerError):
    """Shutting down, or the model is being unloaded (HTTP 503, gRPC UNAVAILABLE)."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    reason = "unavailable"


def internal(error: BaseException) -> ServerError:
    """What any other failure (a failing model, a bug) is answered with: HTTP 500, gRPC
    INTERNAL, and what went wrong."""
    return ServerError(f"internal error: {type(error).__name__}: {error}")


def refusal(error: BaseException) -> BaseException:
    """An engine's refusal (``Overloaded``, ``EngineClosed``) as the server error it is
    answered with; any other error as it is."""
    from recserve.engine.interface import EngineClosed, Overloaded

    if isinstance(error, Overloaded):
        return QueueFull(f"engine queue is full; retry later ({error})")
    if isinstance(error, EngineClosed):
        return Unavailable(f"engine is shutting down ({error})")
    return error


WIRE_ERRORS: dict[str, type[ServerError]] = {
    cls.__name__: cls
    for cls in (ServerError, InvalidArgument, NotFound, PayloadTooLarge, QueueFull, Unavailable)
}
"""The errors a failed request's reply frame names between recserve's own processes."""


def error_frame(call: int, error: ServerError) -> dict[str, Any]:
    """The reply frame of request ``call`` failed with ``error``: its class and message."""
    name = next(c.__name__ for c in type(error).__mro__ if c.__name__ in WIRE_ERRORS)
    return {"id": call, "error": name, "message": str(error)}


def error_from_frame(meta: dict[str, Any]) -> ServerError:
    """The error a reply frame made by :func:`error_frame` names."""
    return WIRE_ERRORS.get(meta["error"], ServerError)(meta["message"])
