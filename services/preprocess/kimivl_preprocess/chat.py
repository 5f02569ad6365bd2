"""A chat, transport aside: prepare the prompt, hand it to the inference tier, relay its stream.

Both front-door transports (gRPC ChatService, and any other port) run chats through
:class:`ChatFlow`. The stream's deltas stay the inference tier's serialized GenerateResponse
bytes (ChatResponse has the same wire layout, so the gRPC transport relays them untouched);
the final result is parsed once, to add this tier's timings.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from kimivl.v1 import chat_pb2, types_pb2
from kimivl_contract import errors
from kimivl_contract.limits import check_sampling
from kimivl_hosting import tracing

from . import metrics
from .codec import generate_request
from .inference_client import InferenceClient, ShedWindow, client_status
from .pipeline import Prepared, Preprocessor
from .uploads import UploadGate

RESULT_TAG = 0x12  # GenerateResponse/ChatResponse field 2 (result), wire type 2: a result's first byte


@dataclass
class ChatStart:
    """What the transport needs before streaming."""
    prepared: Prepared
    request_id: str
    arrived_s: float  # time.perf_counter() at arrival
    span: object = None  # the transport's server span (kimivl_hosting.tracing), None when off
    probe: bool = False  # this chat probes whether a shedding inference tier has room again (ShedWindow)


class ChatFlow:
    def __init__(self, preprocessor: Preprocessor, inference: InferenceClient, wire_dtype: str,
                 uploads: UploadGate | None = None, shed_window: ShedWindow | None = None):
        self.pre = preprocessor
        self.inference = inference
        self.wire_dtype = wire_dtype
        self.uploads = uploads or UploadGate(0)
        self.shed_window = shed_window or ShedWindow()

    async def prepare(self, request: chat_pb2.ChatRequest, arrived_s: float | None = None,
                      span=None) -> ChatStart:
        """Check the options and build the prompt (RequestError for bad input). ``span``: the
        transport's server span, parent of this chat's spans."""
        arrived_s = time.perf_counter() if arrived_s is None else arrived_s
        check_sampling(request.sampling, request.thinking)
        probe = self.shed_window.check()  # the inference tier is shedding: refuse before any work

        def admitted():  # checked again after waiting for the front door's budget: the tier may have begun shedding
            nonlocal probe
            probe = probe or self.shed_window.check()

        max_tokens = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else None
        try:
            with metrics.PREPROCESS_SECONDS.time(), tracing.child("preprocess", span) as ps:
                prepared = await self.pre.prepare(request, self.wire_dtype, max_tokens=max_tokens, span=ps,
                                                  admitted=admitted)
                tracing.set_attributes(ps, images=prepared.prompt.images)
        except BaseException:
            if probe:
                self.shed_window.probe_done(False)  # it never reached the tier: the next chat probes
            raise
        metrics.IMAGES.inc(prepared.prompt.images)
        rid = request.request_id or uuid.uuid4().hex
        tracing.set_attributes(span, request_id=rid, images=prepared.prompt.images)
        return ChatStart(prepared, rid, arrived_s, span, probe)

    def upstream_status(self, e: grpc.aio.AioRpcError) -> errors.Status:
        """What a client is told of the inference tier's error ``e`` (every port says the same)."""
        return client_status(e, self.inference.target)

    async def stream(self, start: ChatStart, request: chat_pb2.ChatRequest,
                     timeout_s: float | None) -> AsyncIterator[bytes | chat_pb2.ChatResponse]:
        """The reply: raw delta messages (bytes), then the result as a ChatResponse with this tier's
        timings. grpc.aio.AioRpcError from the inference tier propagates; leaving early cancels
        the inference call (and so the engine request)."""
        message = [generate_request(start.prepared.prompt, sampling=request.sampling, thinking=request.thinking,
                                    request_id=start.request_id)]
        start.prepared.prompt.release()  # the tensors now live in the message only
        gen = tracing.start("inference.Generate", parent=start.span, kind="client")
        with metrics.UPLOAD_SECONDS.time(), tracing.child("inference.upload", start.span):
            # pop: the call holds the bytes while it may retry; a stream of minutes need not hold them too
            try:
                call = await self.uploads.start(
                    lambda: self.inference.generate(message.pop(), timeout_s, tracing.headers(gen)))
            except BaseException:
                if start.probe:
                    self.shed_window.probe_done(False)
                raise
        first = True
        code = "CANCELLED"
        probe = start.probe
        try:
            if probe:  # the tier sends its headers once it has admitted a request: the window can stay closed
                await call.initial_metadata()
                if not call.done() or await call.code() == grpc.StatusCode.OK:
                    self.shed_window.probe_done(True)
                    probe = False
            async for raw in call:
                if first:
                    metrics.CHAT_TTFT.observe(time.perf_counter() - start.arrived_s)
                    tracing.add_event(gen, "first_token")
                    first = False
                if raw[:1] == bytes([RESULT_TAG]):
                    result = with_front_door_timings(raw, start.prepared.preprocess_ms, start.arrived_s)
                    _trace_result(start.span, result.result)
                    code = "OK"
                    yield result
                else:
                    yield raw
        except grpc.aio.AioRpcError as e:
            code = e.code().name
            self.shed_window.observe(e)
            raise
        finally:
            if probe:  # shed (the window has reopened), failed or abandoned
                self.shed_window.probe_done(False)
            call.cancel()  # no-op once finished; aborts the engine request if the client left
            tracing.end(gen, code)


def _trace_result(span, result) -> None:
    if span is None:
        return
    u = result.usage
    tracing.set_attributes(span, prompt_tokens=u.prompt_tokens, cached_prompt_tokens=u.cached_prompt_tokens,
                           image_tokens=u.image_tokens, thinking_tokens=u.thinking_tokens,
                           answer_tokens=u.answer_tokens, ttft_ms=round(result.timings.time_to_first_token_ms, 1),
                           finish_reason=types_pb2.FinishReason.Name(result.finish_reason))


def with_front_door_timings(raw: bytes, preprocess_ms: float, arrived_s: float) -> chat_pb2.ChatResponse:
    msg = chat_pb2.ChatResponse.FromString(raw)
    t = msg.result.timings
    inference_total = t.total_ms
    t.preprocess_ms = preprocess_ms
    t.total_ms = (time.perf_counter() - arrived_s) * 1e3
    # First token as the caller saw it: everything before inference's own TTFT.
    t.time_to_first_token_ms += t.total_ms - inference_total
    return msg
