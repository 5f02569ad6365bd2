"""Request errors and the gRPC status each one answers with.

Every check in both tiers raises :class:`RequestError` (or a subclass) with a message that
names the field and the limit; a server turns it into a status with :func:`answer` (or
:func:`abort`), in one place, so the mapping is never written twice.

Every message a client is shown goes through :func:`client_message` here: control characters
escaped and at most ~1 KB, so text from elsewhere (a remote server's answer, a decoder's
complaint) can neither break gRPC's metadata limits nor smuggle bytes into a client's logs.
"""
from __future__ import annotations

import math

import grpc

MAX_MESSAGE_CHARS = 1024
# Trailing metadata of a load-shedding answer: how long to wait before retrying (integer ms).
# ``grpc-retry-pushback-ms`` is the name gRPC clients' retry policies read (gRFC A6).
RETRY_AFTER_KEY = "retry-after-ms"
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
PUSHBACK_NOW_MS = 1  # "retry at once" (see Overloaded: 0 makes grpcio's retry hang)


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

    def trailing_metadata(self, pushback: str | None = None) -> tuple[tuple[str, str], ...]:
        return ()


class Unauthenticated(RequestError):
    """No valid credentials (UNAUTHENTICATED)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Overloaded(RequestError):
    """Load shed before any work was done; safe to retry elsewhere or later (UNAVAILABLE).

    The message ends with the hint ("retry after 0.5 s"); the trailing metadata carries it as
    ``retry-after-ms``, and, where asked, ``grpc-retry-pushback-ms`` for clients' retry policies:
    ``pushback="hint"`` (retry after the hint: the client-facing tier) or ``"now"`` (1 ms: between
    the tiers, where the front door's retry goes to the next replica at once, and an answer that
    every replica is at capacity comes back in milliseconds). Not 0: grpcio 1.85's retry given a
    pushback of 0 never makes its next attempt, and the call hangs until its deadline.
    """

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str, *, retry_after_s: float = 1.0):
        retry_after_s = retry_after_s if math.isfinite(retry_after_s) else 1.0
        self.retry_after_s = max(0.0, retry_after_s)
        super().__init__(f"{message}; retry after {self.retry_after_s:.2g} s")

    @property
    def retry_after_ms(self) -> int:
        return max(1, round(self.retry_after_s * 1e3))

    def trailing_metadata(self, pushback: str | None = None) -> tuple[tuple[str, str], ...]:
        md = ((RETRY_AFTER_KEY, str(self.retry_after_ms)),)
        if pushback is None:
            return md
        return (*md, (RETRY_PUSHBACK_KEY, str(self.retry_after_ms if pushback == "hint" else PUSHBACK_NOW_MS)))


def retry_after_s(metadata) -> float | None:
    """The ``retry-after-ms`` hint in a call's (trailing) metadata, in seconds; None if absent or not a number."""
    for key, value in metadata or ():
        if key == RETRY_AFTER_KEY:
            try:
                ms = int(value)
            except (TypeError, ValueError):
                return None
            return ms / 1e3 if 0 <= ms <= 3_600_000 else None
    return None


def client_message(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` as a client may see it: non-printable characters escaped (``\\x1b``, ``\\u2028``),
    at most ``limit`` characters, a longer text cut with a note of how much was left out."""
    head = text[:limit]
    if not head.isprintable():
        head = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                       for c in head)
    if len(text) <= limit and len(head) <= limit:
        return head
    note = f"… ({len(text)} characters, cut)"
    return head[: max(0, limit - len(note))] + note


def quote(value, limit: int = 80) -> str:
    """A short, escaped rendering of untrusted ``value`` (e.g. bytes from a remote) to embed in a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def status_code(error: RequestError) -> grpc.StatusCode:
    return error.code


def answer(context: grpc.aio.ServicerContext, error: RequestError, *, pushback: str | None = None) -> None:
    """Set the RPC's status to ``error``; the handler then returns (or ends its stream).
    ``pushback``: see :class:`Overloaded`.

    Prefer this to :func:`abort` in handlers: grpc.aio keeps an abort's exception in the call's
    state, and the exception's frames hold the call (and the request: a 60 MB text, a message of
    images) in a reference cycle that only the garbage collector frees, which an idle server
    does not run.
    """
    set_status(context, error.code, str(error), error.trailing_metadata(pushback))


def set_status(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str,
               trailing_metadata: tuple = ()) -> None:
    """The RPC's status, its message through :func:`client_message`; the handler then returns."""
    context.set_code(code)
    context.set_details(client_message(details))
    if trailing_metadata:
        context.set_trailing_metadata(trailing_metadata)


async def abort(context: grpc.aio.ServicerContext, error: RequestError, *, pushback: str | None = None):
    """Answer ``error`` as the RPC's status and raise, as ``context.abort`` does (see :func:`answer`)."""
    error.__traceback__ = None  # at least ``error``'s own frames are not kept alive by the abort
    await context.abort(error.code, client_message(str(error)), trailing_metadata=error.trailing_metadata(pushback))
