"""The front door's gRPC services: ChatService and PreprocessService (transport only).

Requests are turned into prepared prompts by the pipeline and chats run through
:class:`~kimivl_preprocess.chat.ChatFlow`; errors become statuses here, and nowhere else.
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from kimivl.v1 import chat_pb2, preprocess_pb2, types_pb2
from kimivl_contract import dtypes, errors
from kimivl_contract.errors import RequestError
from kimivl_hosting import tracing

from . import metrics
from .chat import ChatFlow
from .codec import preprocess_response
from .pipeline import Preprocessor

log = logging.getLogger("kimivl.preprocess")

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
PREPROCESS_SERVICE = preprocess_pb2.DESCRIPTOR.services_by_name["PreprocessService"].full_name


def serialize(msg) -> bytes:
    """Response serializer: relayed messages are already bytes."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


# Errors are answered with errors.answer / answer_with, not context.abort: see errors.answer.


class ChatServicer:
    def __init__(self, flow: ChatFlow):
        self.flow = flow

    async def Chat(self, request: chat_pb2.ChatRequest, context: grpc.aio.ServicerContext):
        arrived = time.perf_counter()
        code = grpc.StatusCode.OK
        span = tracing.start(f"{CHAT_SERVICE}/Chat", parent=tracing.extract(context.invocation_metadata() or ()),
                             kind="server") if tracing.enabled else None
        try:
            start = await self.flow.prepare(request, arrived, span)
            async for msg in self.flow.stream(start, request, context.time_remaining()):
                yield msg
        except RequestError as e:
            code = e.code
            errors.answer(context, e, pushback="hint")
        except grpc.aio.AioRpcError as e:
            s = self.flow.upstream_status(e)
            code = s.code
            errors.set_status(context, s)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:  # a bug, not bad input: log it, answer a clean status
            log.exception("Chat %s failed", request.request_id)
            code = grpc.StatusCode.INTERNAL
            errors.answer_with(context, code, f"internal error: {type(e).__name__}", reason=errors.Reason.INTERNAL)
        finally:
            metrics.REQUESTS.labels("Chat", code.name).inc()
            tracing.end(span, code.name)


class PreprocessServicer:
    def __init__(self, preprocessor: Preprocessor):
        self.pre = preprocessor

    async def Preprocess(self, request: preprocess_pb2.PreprocessRequest, context: grpc.aio.ServicerContext):
        code = grpc.StatusCode.OK
        span = tracing.start(f"{PREPROCESS_SERVICE}/Preprocess", kind="server",
                             parent=tracing.extract(context.invocation_metadata() or ())) if tracing.enabled else None
        try:
            with metrics.PREPROCESS_SECONDS.time():
                if request.dtype not in dtypes.BY_PROTO:  # proto3 enums are open: any number can arrive
                    raise RequestError(f"dtype {request.dtype} is not a TensorDtype; use one of "
                                       f"{', '.join(types_pb2.TensorDtype.keys())}", field="dtype")
                prepared = await self.pre.prepare(request, dtypes.BY_PROTO[request.dtype].name, span=span)
            metrics.IMAGES.inc(prepared.prompt.images)
            return preprocess_response(prepared.prompt, prompt_text=prepared.prompt_text,
                                       preprocess_ms=prepared.preprocess_ms)
        except RequestError as e:
            code = e.code
            errors.answer(context, e, pushback="hint")
        except Exception as e:  # a bug, not bad input: log it, answer a clean status
            log.exception("Preprocess failed")
            code = grpc.StatusCode.INTERNAL
            errors.answer_with(context, code, f"internal error: {type(e).__name__}", reason=errors.Reason.INTERNAL)
        finally:
            metrics.REQUESTS.labels("Preprocess", code.name).inc()
            tracing.end(span, code.name)


def handlers(chat: ChatServicer, preprocess: PreprocessServicer) -> dict[str, dict]:
    """Generic handlers by service (responses go through :func:`serialize`)."""
    return {
        CHAT_SERVICE: {"Chat": grpc.unary_stream_rpc_method_handler(
            chat.Chat, request_deserializer=chat_pb2.ChatRequest.FromString, response_serializer=serialize)},
        PREPROCESS_SERVICE: {"Preprocess": grpc.unary_unary_rpc_method_handler(
            preprocess.Preprocess, request_deserializer=preprocess_pb2.PreprocessRequest.FromString,
            response_serializer=serialize)},
    }
