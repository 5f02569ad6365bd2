"""Request errors, the gRPC status each one answers with, and the details programs read.

Every check in both tiers raises :class:`RequestError` (or a subclass) with a message that names
the field and the limit; a server answers it with :func:`answer`, in one place,
so the mapping is never written twice. Besides the message, each status carries ``google.rpc``
details (grpcio-status, in the ``grpc-status-details-bin`` trailer): ``ErrorInfo`` with a stable
``reason`` (domain ``kimivl``), ``BadRequest.FieldViolation`` with the field's path,
``QuotaFailure`` for limits and ``RetryInfo`` where retrying helps; a shed request's hint also
travels as ``retry-after-ms`` (and ``grpc-retry-pushback-ms`` where asked, for retry policies).

Every message a client is shown goes through :func:`clip` here: control characters escaped and
at most ~1 KB, so text from elsewhere (a remote server's answer, a decoder's complaint) can
neither break gRPC's metadata limits nor smuggle bytes into a client's logs.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import grpc

DOMAIN = "kimivl"
MAX_MESSAGE_CHARS = 1024  # a status message travels in a header: keep it readable and well under limits
# Trailing metadata of a load-shedding answer: how long to wait before retrying (integer ms).
# ``grpc-retry-pushback-ms`` is the name gRPC clients' retry policies read (gRFC A6).
RETRY_AFTER_KEY = "retry-after-ms"
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
PUSHBACK_NOW_MS = 1  # "retry at once" (see Overloaded: 0 makes grpcio's retry hang)
PUSHBACK_NEVER = "-1"  # "do not retry" (gRFC A6: a negative pushback)
DETAILS_KEY = "grpc-status-details-bin"


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

    def trailing_metadata(self, pushback: str | None = None) -> tuple[tuple[str, str], ...]:
        """Trailers besides the details (see :class:`Overloaded`)."""
        return ()


class Unauthenticated(RequestError):
    """No valid credentials (UNAUTHENTICATED)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = Reason.UNAUTHENTICATED


class Overloaded(RequestError):
    """Load shed before any work was done; safe to retry elsewhere or later (UNAVAILABLE).

    The message ends with the hint ("retry after 0.5 s"), RetryInfo carries it, and the trailing
    metadata as ``retry-after-ms``, and, where asked, ``grpc-retry-pushback-ms`` for clients' retry
    policies: ``pushback="hint"`` (retry after the hint: the client-facing tier) or ``"now"`` (1 ms:
    between the tiers, where the front door's retry goes to the next replica at once, and an answer
    that every replica is at capacity comes back in milliseconds). Not 0: grpcio 1.85's retry given
    a pushback of 0 never makes its next attempt, and the call hangs until its deadline. A request
    that ``waited`` its whole turn in a queue gets ``-1`` instead of ``"now"`` (no retry): another
    attempt would wait as long again (three attempts, three waits), and the client should hear it.
    """

    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.OVERLOADED

    def __init__(self, message: str, *, retry_after_s: float = 1.0, waited: bool = False, **kw):
        retry_after_s = retry_after_s if math.isfinite(retry_after_s) else 1.0
        self.retry_after_s = max(0.0, retry_after_s)
        self.waited = waited
        super().__init__(f"{message}; retry after {self.retry_after_s:.2g} s", **kw)

    @property
    def retry_after_ms(self) -> int:
        return max(1, round(self.retry_after_s * 1e3))

    def trailing_metadata(self, pushback: str | None = None) -> tuple[tuple[str, str], ...]:
        md = ((RETRY_AFTER_KEY, str(self.retry_after_ms)),)
        if pushback is None:
            return md
        if pushback == "hint":
            return (*md, (RETRY_PUSHBACK_KEY, str(self.retry_after_ms)))
        return (*md, (RETRY_PUSHBACK_KEY, PUSHBACK_NEVER if self.waited else str(PUSHBACK_NOW_MS)))


class Status(NamedTuple):
    """A status to answer: its code, clipped message and trailing metadata (details first)."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple


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


def own_details(trailing_metadata):
    """The ``(reason, retry_after_s)`` of a status this project's servers answered (its ErrorInfo
    has domain ``kimivl``), from a call's trailing metadata; None for any other status (gRPC's own,
    a foreign server's)."""
    raw = next((v for k, v in trailing_metadata or () if k == DETAILS_KEY), None)
    if not isinstance(raw, bytes):
        return None
    from google.protobuf.message import DecodeError
    from google.rpc import error_details_pb2, status_pb2

    try:
        packed = status_pb2.Status.FromString(raw).details
    except DecodeError:
        return None
    reason, retry = None, None
    for a in packed:
        if a.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            a.Unpack(info)
            if info.domain == DOMAIN:
                reason = info.reason
        elif a.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            r = error_details_pb2.RetryInfo()
            a.Unpack(r)
            retry = r.retry_delay.ToNanoseconds() / 1e9
    return (reason, retry) if reason else None


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
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


def status(code: grpc.StatusCode, message: str, *, reason: str, field: str | None = None,
           limit: int | float | None = None, retry_after_s: float | None = None, metadata: dict | None = None,
           trailers: tuple = ()):
    """A :class:`Status` (code, clipped message, trailers with the google.rpc details, then ``trailers``)."""
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
    s = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=packed))
    return Status(s.code, s.details, (*s.trailing_metadata, *trailers))


def status_of(error: RequestError, *, pushback: str | None = None):
    """``error``'s status; ``pushback``: see :class:`Overloaded`."""
    metadata = {"field": error.field} if error.field else {}
    if error.limit is not None:
        metadata["limit"] = error.limit
    return status(error.code, str(error), reason=error.reason, field=error.field, limit=error.limit,
                  retry_after_s=error.retry_after_s, metadata=metadata, trailers=error.trailing_metadata(pushback))


def set_status(context: grpc.aio.ServicerContext, s: Status) -> None:
    """Set the RPC's status to ``s``; the handler then returns (or ends its stream)."""
    context.set_code(s.code)
    context.set_details(s.details)
    context.set_trailing_metadata(s.trailing_metadata)


def answer(context: grpc.aio.ServicerContext, error: RequestError, *, pushback: str | None = None) -> None:
    """Set the RPC's status to ``error``, with its details; the handler then returns (or ends its
    stream). ``pushback``: see :class:`Overloaded`.

    Not ``context.abort``: grpc.aio keeps an abort's exception in the call's state, and the
    exception's frames hold the call (and the request: a 60 MB text, a message of images) in a
    reference cycle that only the garbage collector frees, which an idle server does not run.
    """
    set_status(context, status_of(error, pushback=pushback))


def answer_with(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, *, reason: str,
                retry_after_s: float | None = None, trailers: tuple = ()) -> None:
    """:func:`answer` for a status that is not a RequestError (UNAVAILABLE, INTERNAL, …)."""
    set_status(context, status(code, message, reason=reason, retry_after_s=retry_after_s, trailers=trailers))

