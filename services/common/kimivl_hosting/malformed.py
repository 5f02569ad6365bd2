"""Request bytes that are not the method's message: INVALID_ARGUMENT, not UNKNOWN.

grpc.aio calls a method's request deserializer before the servicer: an exception there is
answered UNKNOWN ("Unexpected DecodeError") and logged with a traceback, one per garbage
request. So each handler's deserializer is wrapped: a parse error becomes a :class:`Malformed`
value, and the wrapped behaviour answers it INVALID_ARGUMENT before the servicer runs.
"""
from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from kimivl_contract import errors


class Malformed:
    """What the deserializer returns for bytes it cannot parse."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


def _tolerant(deserializer):
    owner = getattr(deserializer, "__self__", None)  # a message class's FromString
    name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "the method's request message")

    def parse(raw: bytes):
        try:
            return deserializer(raw)
        except (DecodeError, UnicodeDecodeError) as e:
            reason = str(e).rsplit(": ", 1)[-1] if ": " in str(e) else type(e).__name__
            return Malformed(f"the request is not a valid {name} ({reason})")

    return parse


def _refuse(context, request: Malformed) -> None:
    errors.answer_with(context, grpc.StatusCode.INVALID_ARGUMENT, request.message, reason=errors.Reason.INVALID_ARGUMENT)


def refuse_malformed(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` with a deserializer that cannot raise, and a behaviour that answers malformed
    bytes INVALID_ARGUMENT (handlers without a deserializer are returned as they are)."""
    if handler.request_deserializer is None or handler.request_streaming:
        return handler
    parse = _tolerant(handler.request_deserializer)
    if handler.unary_stream:
        inner_stream = handler.unary_stream

        async def stream(request, context):
            if isinstance(request, Malformed):
                _refuse(context, request)
                return
            async for msg in inner_stream(request, context):
                yield msg

        return grpc.unary_stream_rpc_method_handler(stream, parse, handler.response_serializer)
    inner_unary = handler.unary_unary

    async def unary(request, context):
        if isinstance(request, Malformed):
            return _refuse(context, request)
        return await inner_unary(request, context)

    return grpc.unary_unary_rpc_method_handler(unary, parse, handler.response_serializer)
