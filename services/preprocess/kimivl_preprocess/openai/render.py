"""A chat's reply as OpenAI Chat Completions JSON: one ``chat.completion``, or SSE
``chat.completion.chunk`` events ending with ``data: [DONE]``.

Thinking goes apart from the answer, in both names clients read: ``reasoning_content`` (the
DeepSeek / older vLLM name) and ``reasoning`` (vLLM's current one). Usage counts thinking in
``completion_tokens_details.reasoning_tokens``. Each chunk is the JSON of its delta inside a
prefix rendered once per stream: a delta costs one small ``json.dumps``.
"""
from __future__ import annotations

import json
import time

from kimivl.v1 import types_pb2

FINISH = {types_pb2.FINISH_REASON_STOP: "stop", types_pb2.FINISH_REASON_LENGTH: "length",
          types_pb2.FINISH_REASON_ABORT: "abort"}
DONE = b"data: [DONE]\n\n"


def finish_reason(result: types_pb2.GenerationResult) -> str:
    return FINISH.get(result.finish_reason, "stop")


def usage(result: types_pb2.GenerationResult) -> dict:
    u = result.usage
    completion = u.thinking_tokens + u.answer_tokens
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": completion,
            "total_tokens": u.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens, "image_tokens": u.image_tokens},
            "completion_tokens_details": {"reasoning_tokens": u.thinking_tokens}}


def completion(completion_id: str, model: str, created: int, thinking: str, answer: str,
               result: types_pb2.GenerationResult, show_reasoning: bool) -> dict:
    message = {"role": "assistant", "content": answer or None}
    if show_reasoning:
        message["reasoning_content"] = message["reasoning"] = thinking or None
    message["tool_calls"] = []
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(result),
                         "stop_reason": None}],
            "usage": usage(result)}


class StreamRenderer:
    """SSE bytes for one stream: :meth:`delta` per GenerationDelta, then :meth:`end`."""

    def __init__(self, completion_id: str, model: str, include_usage: bool, created: int | None = None):
        created = int(time.time()) if created is None else created
        head = json.dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                           "model": model})[:-1]
        self.include_usage = include_usage
        usage_null = ',"usage":null' if include_usage else ""
        self._choice = (f'data: {head},"choices":[{{"index":0,"delta":').encode()
        self._open = (',"logprobs":null,"finish_reason":null}]' + usage_null + "}\n\n").encode()
        self._head = head
        self._started = False

    def delta(self, thinking: str, answer: str) -> bytes:
        """The chunk of one delta (b"" without text); the first is preceded by the ``role`` chunk,
        as vLLM sends it, at the first token."""
        out = b""
        if not self._started:
            self._started = True
            out = self._choice + b'{"role":"assistant","content":""}' + self._open
        if not (thinking or answer):
            return out
        d = {}
        if thinking:
            d["reasoning_content"] = d["reasoning"] = thinking
        if answer:
            d["content"] = answer
        return out + self._choice + json.dumps(d).encode() + self._open

    def end(self, result: types_pb2.GenerationResult) -> bytes:
        """The finish chunk, the usage chunk when asked for, and ``[DONE]``."""
        out = b"" if self._started else self.delta("", "")
        tail = ',"usage":null' if self.include_usage else ""
        out += (self._choice + b'{},"logprobs":null,"finish_reason":' + json.dumps(finish_reason(result)).encode()
                + b',"stop_reason":null}]' + tail.encode() + b"}\n\n")
        if self.include_usage:
            out += f'data: {self._head},"choices":[],"usage":{json.dumps(usage(result))}}}\n\n'.encode()
        return out + DONE

    @staticmethod
    def error(body: dict) -> bytes:
        """An error after the stream has started (its status was 200 already), then ``[DONE]``."""
        return f"data: {json.dumps(body)}\n\n".encode() + DONE
