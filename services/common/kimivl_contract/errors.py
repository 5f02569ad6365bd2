"""Request errors, the gRPC status each one answers with, and the details programs read.

Every check in both tiers raises :class:`RequestError` (or a subclass) with a message that names
the field and the limit; a server answers it with :func:`abort`, in one place, so the mapping is
never written twice. Besides the message, each status carries ``google.rpc`` details
(grpcio-status, in the ``grpc-status-details-bin`` trailer): ``ErrorInfo`` with a stable
``reason`` (domain ``kimivl``), ``BadRequest.FieldViolation`` with the field's path,
``QuotaFailure`` for limits and ``RetryInfo`` where retrying helps.
"""
from __future__ import annotations

import grpc

DOMAIN = "kimivl"
MAX_MESSAGE_CHARS = 1024  # a status message travels in a header: keep it readable and well under limits


class Reason:
    """Stable ``ErrorInfo.reason`` values (programs branch on these, not on messages)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # a field out of range or malformed
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"  # a size or count limit (RESOURCE_EXHAUSTED)
    CONTEXT_EXCEEDED = "CONTEXT_EXCEEDED"  # prompt (+ max_tokens) longer than the model's context
    UNAUTHENTICATED = "UNAUTHENTICATED"
    OVERLOADED = "OVERLOADED"  # shed before work was done; retry later or elsewhere
    UNAVAILABLE = "UNAVAILABLE"  # no replica to serve it now (starting, draining, down)
    INTERNAL = "INTERNAL"


class RequestError(ValueError):
    """A request the service cannot take, by the caller's doing.

    ``resource_exhausted`` marks size and count limits (RESOURCE_EXHAUSTED rather than
    INVALID_ARGUMENT); ``field`` is the offending field's path where one is known (e.g.
    ``conversation.messages[0].content[1].image``); ``reason`` a :class:`Reason`; ``limit`` the
    limit's value where one was exceeded.
    """

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = Reason.INVALID_ARGUMENT
    retry_after_s: float | None = None

    def __init__(self, message: str, *, resource_exhausted: bool = False, field: str | None = None,
                 reason: str | None = None, limit: int | float | None = None):
        super().__init__(message)
        self.resource_exhausted = resource_exhausted
        self.field = field
        self.limit = limit
        if resource_exhausted:
            self.code = grpc.StatusCode.RESOURCE_EXHAUSTED
            self.reason = Reason.LIMIT_EXCEEDED
        if reason:
            self.reason = reason


class Unauthenticated(RequestError):
    """No valid credentials (UNAUTHENTICATED)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = Reason.UNAUTHENTICATED


class Overloaded(RequestError):
    """Load shed before any work was done; safe to retry elsewhere or later (UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.OVERLOADED

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **kw):
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


def clip(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A client-facing message: at most ``limit`` characters, control characters escaped."""
    message = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in message)
    return message if len(message) <= limit else message[: limit - 1] + "…"


def status(code: grpc.StatusCode, message: str, *, reason: str, field: str | None = None,
           limit: int | float | None = None, retry_after_s: float | None = None, metadata: dict | None = None):
    """A ``grpc.Status`` (code, clipped message, trailers with the google.rpc details)."""
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    message = clip(message)
    details = [error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN,
                                           metadata={k: str(v) for k, v in (metadata or {}).items()})]
    if field:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=message)]))
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        details.append(error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(
            subject=field or "request", description=message)]))
        if field:
            details.append(error_details_pb2.ResourceInfo(
                resource_type=field.rsplit(".", 1)[-1].split("[", 1)[0], resource_name=field,
                description=f"limit {limit:g}" if limit is not None else message))
    if retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=packed))


def status_of(error: RequestError):
    metadata = {"field": error.field} if error.field else {}
    if error.limit is not None:
        metadata["limit"] = error.limit
    return status(error.code, str(error), reason=error.reason, field=error.field, limit=error.limit,
                  retry_after_s=error.retry_after_s, metadata=metadata)


async def abort(context: grpc.aio.ServicerContext, error: RequestError):
    """Answer ``error`` as the RPC's status, with its details (raises, as ``context.abort`` does)."""
    s = status_of(error)
    await context.abort(s.code, s.details, s.trailing_metadata)


async def abort_with(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, *, reason: str,
                     retry_after_s: float | None = None):
    """Answer a status that is not a RequestError (UNAVAILABLE, INTERNAL, …) with its details."""
    s = status(code, message, reason=reason, retry_after_s=retry_after_s)
    await context.abort(s.code, s.details, s.trailing_metadata)
