"""Request errors and the gRPC status each one answers with.

Every check in both tiers raises :class:`RequestError` (or a subclass) with a message that
names the field and the limit; a server turns it into a status with :func:`status_code` and
:func:`abort`, in one place, so the mapping is never written twice.
"""
from __future__ import annotations

import grpc


class RequestError(ValueError):
    """A request the service cannot take, by the caller's doing.

    ``resource_exhausted`` marks size and count limits (RESOURCE_EXHAUSTED rather than
    INVALID_ARGUMENT); ``field`` is the offending field's path where one is known (e.g.
    ``conversation.messages[0].content[1].image``).
    """

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, resource_exhausted: bool = False, field: str | None = None):
        super().__init__(message)
        self.resource_exhausted = resource_exhausted
        self.field = field
        if resource_exhausted:
            self.code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(RequestError):
    """No valid credentials (UNAUTHENTICATED)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Overloaded(RequestError):
    """Load shed before any work was done; safe to retry elsewhere or later (UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, *, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def status_code(error: RequestError) -> grpc.StatusCode:
    return error.code


async def abort(context: grpc.aio.ServicerContext, error: RequestError):
    """Answer ``error`` as the RPC's status (raises, as ``context.abort`` does)."""
    await context.abort(error.code, str(error))
