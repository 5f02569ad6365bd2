"""Python SDK for the kimivl front door (ChatService, PreprocessService).

    from kimivl.client import Client
    with Client("localhost:50051") as c:
        for ev in c.stream(["What is in this picture?", Path("cat.jpg")]):
            print(ev.thinking, ev.answer, end="")
        r = c.chat(["Describe", "https://example.com/a.jpg"], sampling={"max_tokens": 256})
        print(r.thinking, r.answer, r.usage.answer_tokens)

Content is a list of parts in order: ``str`` text, or an image as a ``pathlib.Path``,
``bytes``, a PIL image, an ``http(s)://`` URL or a ``data:`` URI. Errors raise
:class:`KimiVLError` subclasses carrying the gRPC status and the server's message.
UNAVAILABLE is retried by gRPC itself (service config), only before a stream starts.
"""
from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kimivl.v1 import chat_pb2, chat_pb2_grpc, preprocess_pb2, preprocess_pb2_grpc, types_pb2

__all__ = ["Client", "AsyncClient", "ChatEvent", "ChatResult", "KimiVLError", "InvalidArgument",
           "ResourceExhausted", "Unavailable", "DeadlineExceeded", "Cancelled", "Unauthenticated", "build_request"]

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
PREPROCESS_SERVICE = preprocess_pb2.DESCRIPTOR.services_by_name["PreprocessService"].full_name
MAX_MESSAGE_BYTES = 256 << 20
SERVICE_CONFIG = {
    "methodConfig": [{
        "name": [{"service": CHAT_SERVICE}, {"service": PREPROCESS_SERVICE}],
        "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.2s", "maxBackoff": "2s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }],
}
_ROLES = {"system": types_pb2.ROLE_SYSTEM, "user": types_pb2.ROLE_USER, "assistant": types_pb2.ROLE_ASSISTANT}


# ---------------------------------------------------------------------------- errors
class KimiVLError(Exception):
    """A failed RPC: ``code`` is the grpc.StatusCode, ``details`` the server's message.

    What programs read (the ``google.rpc`` details the servers attach): ``reason`` (a stable
    code, e.g. ``LIMIT_EXCEEDED``, ``OVERLOADED``), ``field_violations`` (``[(field path,
    description)]``), ``quota_violations`` (``[(subject, description)]``), ``retry_after_s`` (set
    where retrying helps) and ``metadata`` (ErrorInfo's, e.g. ``{"field": ..., "limit": ...}``).
    """

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata=()):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.reason: str | None = None
        self.metadata: dict[str, str] = {}
        self.field_violations: list[tuple[str, str]] = []
        self.quota_violations: list[tuple[str, str]] = []
        self.retry_after_s: float | None = None
        for key, value in trailing_metadata or ():
            if key == "grpc-status-details-bin":
                self._read_details(value)

    def _read_details(self, blob: bytes) -> None:
        from google.rpc import error_details_pb2, status_pb2

        for any_ in status_pb2.Status.FromString(blob).details:
            for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.QuotaFailure,
                         error_details_pb2.RetryInfo):
                if any_.Is(kind.DESCRIPTOR):
                    d = kind()
                    any_.Unpack(d)
                    if kind is error_details_pb2.ErrorInfo:
                        self.reason, self.metadata = d.reason, dict(d.metadata)
                    elif kind is error_details_pb2.BadRequest:
                        self.field_violations += [(v.field, v.description) for v in d.field_violations]
                    elif kind is error_details_pb2.QuotaFailure:
                        self.quota_violations += [(v.subject, v.description) for v in d.violations]
                    else:
                        self.retry_after_s = d.retry_delay.ToNanoseconds() / 1e9


class InvalidArgument(KimiVLError):
    pass


class ResourceExhausted(KimiVLError):
    pass


class Unavailable(KimiVLError):
    pass


class DeadlineExceeded(KimiVLError):
    pass


class Cancelled(KimiVLError):
    pass


class Unauthenticated(KimiVLError):
    """No API key, or not one the server knows (``api_key=``)."""


_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument, grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
           grpc.StatusCode.UNAVAILABLE: Unavailable, grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
           grpc.StatusCode.CANCELLED: Cancelled, grpc.StatusCode.UNAUTHENTICATED: Unauthenticated}


def _error(e: grpc.RpcError) -> KimiVLError:
    try:
        trailers = e.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - an error raised before any trailer arrived
        trailers = ()
    return _ERRORS.get(e.code(), KimiVLError)(e.code(), e.details() or "", trailers)


# ---------------------------------------------------------------------------- results
@dataclass
class ChatEvent:
    """One streamed event: new thinking/answer text, or the final ``result``."""
    thinking: str = ""
    answer: str = ""
    token_ids: list[int] = field(default_factory=list)
    result: types_pb2.GenerationResult | None = None


@dataclass
class ChatResult:
    thinking: str
    answer: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length", "abort"
    ended_in_thinking: bool
    usage: types_pb2.Usage
    timings: types_pb2.Timings


def _event(msg: chat_pb2.ChatResponse) -> ChatEvent:
    if msg.WhichOneof("event") == "result":
        return ChatEvent(result=msg.result)
    d = msg.delta
    return ChatEvent(d.thinking, d.answer, list(d.token_ids))


class _Collector:
    def __init__(self):
        self.thinking, self.answer, self.ids, self.result = [], [], [], None

    def add(self, ev: ChatEvent) -> None:
        if ev.result is not None:
            self.result = ev.result
        self.thinking.append(ev.thinking)
        self.answer.append(ev.answer)
        self.ids.extend(ev.token_ids)

    def done(self) -> ChatResult:
        r = self.result
        if r is None:
            raise KimiVLError(grpc.StatusCode.UNKNOWN, "the stream ended without a result")
        reason = types_pb2.FinishReason.Name(r.finish_reason).removeprefix("FINISH_REASON_").lower()
        return ChatResult("".join(self.thinking), "".join(self.answer), self.ids, reason, r.ended_in_thinking,
                          r.usage, r.timings)


# ---------------------------------------------------------------------------- requests
def image_part(source) -> types_pb2.Image:
    """An Image message from a path, bytes, PIL image, URL or data URI."""
    if isinstance(source, types_pb2.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return types_pb2.Image(data=bytes(source))
    if isinstance(source, Path):
        return types_pb2.Image(data=source.read_bytes())
    if isinstance(source, str):
        if source.startswith(("http://", "https://")):
            return types_pb2.Image(url=source)
        if source.startswith("data:"):
            return types_pb2.Image(data_uri=source)
        return types_pb2.Image(data=Path(source).read_bytes())
    if hasattr(source, "save") and hasattr(source, "size"):  # a PIL image: lossless PNG
        buf = io.BytesIO()
        source.save(buf, format="PNG")
        return types_pb2.Image(data=buf.getvalue())
    raise TypeError(f"cannot use {type(source).__name__} as an image")


def _is_image(part) -> bool:
    if isinstance(part, str):
        return part.startswith(("http://", "https://", "data:"))
    return not isinstance(part, str)


def _content(parts) -> list[types_pb2.ContentPart]:
    if isinstance(parts, (str, bytes, Path)) or hasattr(parts, "save"):
        parts = [parts]
    out = []
    for p in parts:
        if isinstance(p, types_pb2.ContentPart):
            out.append(p)
        elif isinstance(p, str) and not _is_image(p):
            out.append(types_pb2.ContentPart(text=p))
        else:
            out.append(types_pb2.ContentPart(image=image_part(p)))
    return out


def build_request(content=None, *, messages: Sequence[dict] | None = None, system: str | None = None,
                  sampling: dict | types_pb2.SamplingParameters | None = None, exclude_thinking: bool = False,
                  max_thinking_tokens: int | None = None, request_id: str = "") -> chat_pb2.ChatRequest:
    """A ChatRequest from one user turn (``content``) or full ``messages``
    (``[{"role": "user", "content": [...]}, ...]``)."""
    conv = types_pb2.Conversation()
    if system:
        conv.messages.add(role=types_pb2.ROLE_SYSTEM, content=[types_pb2.ContentPart(text=system)])
    for m in messages or ():
        conv.messages.add(role=_ROLES[m["role"]], content=_content(m["content"]))
    if content is not None:
        conv.messages.add(role=types_pb2.ROLE_USER, content=_content(content))
    if isinstance(sampling, dict):
        sampling = types_pb2.SamplingParameters(**sampling)
    thinking = types_pb2.ThinkingOptions(exclude_thinking=exclude_thinking)
    if max_thinking_tokens is not None:
        thinking.max_thinking_tokens = max_thinking_tokens
    return chat_pb2.ChatRequest(conversation=conv, sampling=sampling, thinking=thinking, request_id=request_id)


def _channel_options(max_message_bytes: int) -> list:
    return [("grpc.service_config", json.dumps(SERVICE_CONFIG)), ("grpc.enable_retries", 1),
            ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def _credentials(tls: bool, root_certificates: bytes | None):
    return grpc.ssl_channel_credentials(root_certificates) if tls or root_certificates else None


def _metadata(metadata: Iterable[tuple[str, str]], api_key: str | None) -> list[tuple[str, str]]:
    md = list(metadata)
    if api_key:
        md.append(("authorization", f"Bearer {api_key}"))
    return md


# ---------------------------------------------------------------------------- clients
class Client:
    """Blocking client. ``api_key`` is sent with every call as ``authorization: Bearer KEY`` (the
    front door's ``--api-keys-file``); ``metadata`` too (other headers); ``timeout_s`` is each
    call's deadline unless a call gives its own."""

    def __init__(self, target: str = "localhost:50051", *, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, metadata: Iterable[tuple[str, str]] = (),
                 timeout_s: float | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES):
        creds = _credentials(tls, root_certificates)
        opts = _channel_options(max_message_bytes)
        self.channel = (grpc.secure_channel(target, creds, options=opts) if creds
                        else grpc.insecure_channel(target, options=opts))
        self.chat_stub = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.preprocess_stub = preprocess_pb2_grpc.PreprocessServiceStub(self.channel)
        self.metadata = _metadata(metadata, api_key)
        self.timeout_s = timeout_s

    def stream(self, content=None, *, timeout_s: float | None = None, metadata=(), request=None,
               **options) -> Iterator[ChatEvent]:
        """Stream events; the last one carries ``result``. Closing the iterator cancels the call."""
        req = request or build_request(content, **options)
        call = self.chat_stub.Chat(req, timeout=timeout_s or self.timeout_s, metadata=self.metadata + list(metadata))
        try:
            for msg in call:
                yield _event(msg)
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()

    def chat(self, content=None, **kwargs) -> ChatResult:
        """The whole reply, collected."""
        c = _Collector()
        for ev in self.stream(content, **kwargs):
            c.add(ev)
        return c.done()

    def preprocess(self, content=None, *, dtype: int = types_pb2.TENSOR_DTYPE_BFLOAT16, timeout_s=None,
                   **options) -> preprocess_pb2.PreprocessResponse:
        req = build_request(content, **options)
        try:
            return self.preprocess_stub.Preprocess(
                preprocess_pb2.PreprocessRequest(conversation=req.conversation, dtype=dtype),
                timeout=timeout_s or self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _error(e) from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient:
    """asyncio client; same arguments as :class:`Client`."""

    def __init__(self, target: str = "localhost:50051", *, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, metadata: Iterable[tuple[str, str]] = (),
                 timeout_s: float | None = None, max_message_bytes: int = MAX_MESSAGE_BYTES):
        creds = _credentials(tls, root_certificates)
        opts = _channel_options(max_message_bytes)
        self.channel = (grpc.aio.secure_channel(target, creds, options=opts) if creds
                        else grpc.aio.insecure_channel(target, options=opts))
        self.chat_stub = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.preprocess_stub = preprocess_pb2_grpc.PreprocessServiceStub(self.channel)
        self.metadata = _metadata(metadata, api_key)
        self.timeout_s = timeout_s

    async def stream(self, content=None, *, timeout_s: float | None = None, metadata=(), request=None,
                     **options) -> AsyncIterator[ChatEvent]:
        req = request or build_request(content, **options)
        call = self.chat_stub.Chat(req, timeout=timeout_s or self.timeout_s, metadata=self.metadata + list(metadata))
        try:
            async for msg in call:
                yield _event(msg)
        except grpc.RpcError as e:
            raise _error(e) from None
        finally:
            call.cancel()

    async def chat(self, content=None, **kwargs) -> ChatResult:
        c = _Collector()
        async for ev in self.stream(content, **kwargs):
            c.add(ev)
        return c.done()

    async def preprocess(self, content=None, *, dtype: int = types_pb2.TENSOR_DTYPE_BFLOAT16, timeout_s=None,
                         **options) -> preprocess_pb2.PreprocessResponse:
        req = build_request(content, **options)
        try:
            return await self.preprocess_stub.Preprocess(
                preprocess_pb2.PreprocessRequest(conversation=req.conversation, dtype=dtype),
                timeout=timeout_s or self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as e:
            raise _error(e) from None

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
