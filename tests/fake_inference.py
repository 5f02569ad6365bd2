"""A scripted InferenceService on loopback, for front-door behaviour the tiny model cannot show
(it never thinks: its random weights do not emit thinking markers) or that must be timed
exactly (a stream that lasts). It answers every Generate with the same GenerateResponse
messages, ``delay_s`` apart (then fails with ``error``, a (StatusCode, details), if given),
and records each request."""
from __future__ import annotations

import time
from concurrent import futures

import grpc

from kimivl.v1 import inference_pb2, types_pb2

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def thinking_then_answer(thinking: list[str], answer: list[str], *, prompt_tokens: int = 40,
                         image_tokens: int = 16) -> list[inference_pb2.GenerateResponse]:
    """Deltas of thinking, then answer (the boundary delta carries both), then a result."""
    msgs = [inference_pb2.GenerateResponse(delta=types_pb2.GenerationDelta(thinking=t, token_ids=[1]))
            for t in thinking[:-1]]
    msgs.append(inference_pb2.GenerateResponse(delta=types_pb2.GenerationDelta(
        thinking=thinking[-1], answer=answer[0], token_ids=[1, 2])))
    msgs += [inference_pb2.GenerateResponse(delta=types_pb2.GenerationDelta(answer=a, token_ids=[2]))
             for a in answer[1:]]
    msgs.append(inference_pb2.GenerateResponse(result=types_pb2.GenerationResult(
        finish_reason=types_pb2.FINISH_REASON_STOP,
        usage=types_pb2.Usage(prompt_tokens=prompt_tokens, image_tokens=image_tokens, cached_prompt_tokens=8,
                              thinking_tokens=len(thinking), answer_tokens=len(answer)))))
    return msgs


class FakeInference:
    def __init__(self, replies: list[inference_pb2.GenerateResponse], delay_s: float = 0.0,
                 error: tuple[grpc.StatusCode, str] | None = None):
        self.replies = replies
        self.delay_s = delay_s
        self.error = error
        self.requests: list[inference_pb2.GenerateRequest] = []
        self.cancelled = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        handler = grpc.unary_stream_rpc_method_handler(
            self._generate, request_deserializer=inference_pb2.GenerateRequest.FromString,
            response_serializer=inference_pb2.GenerateResponse.SerializeToString)
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(INFERENCE_SERVICE,
                                                                                   {"Generate": handler})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"

    def _generate(self, request, context):
        self.requests.append(request)
        for msg in self.replies:
            if self.delay_s:
                time.sleep(self.delay_s)
            if not context.is_active():
                self.cancelled += 1
                return
            yield msg
        if self.error:
            context.abort(*self.error)

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop(0)
