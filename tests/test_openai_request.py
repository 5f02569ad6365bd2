"""The OpenAI port's request mapping, error mapping and rendering, without servers: what an
OpenAI chat completion body becomes in the domain's ChatRequest, which fields are refused
(naming them), how domain messages are translated to the client's paths, and the JSON/SSE
the reply renders to."""
from __future__ import annotations

import json

import grpc
import pytest

from kimivl.v1 import types_pb2
from kimivl_contract.errors import Overloaded, RequestError
from kimivl_contract.limits import check_sampling
from kimivl_preprocess.openai import errors, render
from kimivl_preprocess.openai.request import OFF_VALUES, to_chat_request

MODELS = ["kimi", "alias"]
URI = "data:image/png;base64,iVBORw0KGgo="


def chat(**body):
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return to_chat_request(body, MODELS)


def refused(**body) -> RequestError:
    with pytest.raises(RequestError) as e:
        chat(**body)
    return e.value


def test_messages_roles_and_content_parts():
    m = chat(model="alias", messages=[
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": [{"type": "text", "text": "really"}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": URI}},
                                     {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg",
                                                                         "detail": "high"}}]},
        {"role": "assistant", "content": "b", "reasoning_content": "earlier thinking", "tool_calls": []},
    ])
    assert m.model == "alias"
    msgs = m.request.conversation.messages
    assert [x.role for x in msgs] == [types_pb2.ROLE_SYSTEM, types_pb2.ROLE_SYSTEM, types_pb2.ROLE_USER,
                                      types_pb2.ROLE_ASSISTANT]
    assert msgs[0].content[0].text == "be brief"
    user = msgs[2].content
    assert user[0].text == "a" and user[1].image.data_uri == URI and user[2].image.url == "https://x.test/a.jpg"
    assert msgs[3].content[0].text == "b"  # the earlier thinking is not fed back (as the chat template does)
    assert chat().model == "kimi", "no model: the first served name, as vLLM"
    with pytest.raises(LookupError):
        chat(model="gpt-4o")


def test_sampling_and_thinking_fields():
    m = chat(max_completion_tokens=7, temperature=0, top_p=0.5, stop="END", seed=42, frequency_penalty=0.5,
             presence_penalty=-1, top_k=5, repetition_penalty=1.1, ignore_eos=True, thinking_token_budget=16,
             include_reasoning=False, stream=True, stream_options={"include_usage": True}, request_id="r-1")
    s, t = m.request.sampling, m.request.thinking
    assert (s.max_tokens, s.temperature, s.top_p, list(s.stop), s.seed, s.top_k) == (7, 0.0, 0.5, ["END"], 42, 5)
    assert (s.frequency_penalty, s.presence_penalty, s.ignore_eos) == (0.5, -1.0, True)
    assert s.repetition_penalty == pytest.approx(1.1)
    assert t.max_thinking_tokens == 16 and t.exclude_thinking and not m.show_reasoning
    assert m.stream and m.include_usage and m.request.request_id == "r-1"
    m = chat(max_tokens=9, top_k=-1, thinking_token_budget=-1, stop=["a", "b"])
    s, t = m.request.sampling, m.request.thinking
    assert s.max_tokens == 9 and list(s.stop) == ["a", "b"]
    assert not s.HasField("top_k") and not t.HasField("max_thinking_tokens"), "-1 means off, as in vLLM"
    assert not m.stream and not m.include_usage and m.show_reasoning
    unset = chat().request.sampling
    assert not any(unset.HasField(f) for f in ("temperature", "top_p", "max_tokens", "seed", "frequency_penalty"))


@pytest.mark.parametrize("body, param", [
    ({"n": 2}, "n"), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"), ({"logprobs": True}, "logprobs"), ({"top_logprobs": 3}, "top_logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"audio": {"voice": "x"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"), ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"reasoning_effort": "low"}, "reasoning_effort"), ({"min_p": 0.1}, "min_p"), ({"best_of": 2}, "best_of"),
    ({"frobnicate": 1}, "frobnicate"), ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"), ({"max_tokens": -1}, "max_tokens"),
    ({"seed": -3}, "seed"), ({"temperature": "hot"}, "temperature"), ({"temperature": True}, "temperature"),
    ({"top_k": -2}, "top_k"), ({"stop": [1]}, "stop"), ({"stream": "yes"}, "stream"), ({"model": 3}, "model"),
    ({"messages": "hi"}, "messages"), ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
                                       "messages[0].role"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": "x", "colour": 1}]}, "messages[0].colour"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": URI, "detail": "low"}}]}]},
     "messages[0].content[0].image_url.detail"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": URI}]}]},
     "messages[0].content[0].image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "cache_control": {}}]}]},
     "messages[0].content[0].cache_control"),
])
def test_unsupported_or_malformed_fields_are_refused_by_name(body, param):
    e = refused(**body)
    assert e.field == param, (str(e), e.field)
    assert param.split(".")[0].split("[")[0] in str(e)


def test_off_values_and_metadata_are_accepted():
    chat(n=1, logprobs=False, top_logprobs=0, tools=[], tool_choice="none", response_format={"type": "text"},
         modalities=["text"], audio=None, store=False, parallel_tool_calls=True, user="u-1",
         metadata={"team": "a"}, safety_identifier="s", prompt_cache_key="k", skip_special_tokens=True)
    for key in OFF_VALUES:
        chat(**{key: None})  # null is absence


def test_domain_messages_are_translated_to_the_clients_paths():
    m = chat(messages=[{"role": "user", "content": "x"}, {"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": URI}}]}],
        max_completion_tokens=0, temperature=9, stop="")
    e = RequestError("conversation.messages[1].content[1].image.data_uri has invalid base64 data: x")
    text = m.translate(str(e))
    assert text == "messages[1].content[1].image_url.url has invalid base64 data: x"
    assert m.param(None, str(e)) == "messages[1].content[1].image_url.url"
    assert m.translate("conversation.messages[1].content[1].image: not an image") == \
        "messages[1].content[1].image_url.url: not an image"
    assert m.param(None, "the prompt (5 tokens) plus sampling.max_tokens (9)") == "max_completion_tokens"
    assert m.param(None, "the prompt is 9000 tokens") is None
    assert m.translate("conversation.messages[0].content[0].text contains the reserved token <|media_pad|>") == \
        "messages[0].content contains the reserved token <|media_pad|>"
    assert m.translate("conversation.messages is empty") == "messages is empty"
    # A limit on the whole conversation (e.g. its image count) names the messages, not a proto field.
    assert m.param("conversation") == "messages"
    assert m.translate("conversation has 9 images; the limit is 8") == "messages has 9 images; the limit is 8"
    assert m.param(None, "conversation.messages[0] has no content") == "messages[0]"
    with pytest.raises(RequestError) as err:
        check_sampling(m.request.sampling, m.request.thinking)
    assert m.translate(str(err.value)).startswith("temperature is 9; allowed range is [0, 2]")
    assert m.param(err.value.field) == "temperature"
    assert m.translate("sampling.stop[0] is 0 bytes") == "stop is 0 bytes"
    assert m.translate("the prompt (5 tokens) plus sampling.max_tokens (9)") == \
        "the prompt (5 tokens) plus max_completion_tokens (9)"
    assert m.translate("conversation.messages[10].content[3].text x") == "messages[10].content[3].text x"
    assert m.translate("conversation.messages[1].role is 0") == "messages[1].role is 0"
    assert m.translate("thinking.max_thinking_tokens is 0") == "thinking_token_budget is 0"


def test_error_statuses_follow_the_grpc_codes():
    too_many = errors.from_request_error(RequestError("the request has 9 images; the limit is 8",
                                                      resource_exhausted=True))
    assert too_many.status == 413 and too_many.body()["error"]["code"] == "request_too_large"
    bad = errors.from_request_error(RequestError("temperature is 9"), param="temperature")
    assert bad.status == 400 and bad.body() == {"error": {"message": "temperature is 9", "type": "invalid_request_error",
                                                          "param": "temperature", "code": None}}
    shed = errors.from_request_error(Overloaded("busy", retry_after_s=3))
    assert shed.status == 503 and shed.headers == {"Retry-After": "3"}
    assert errors.from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full").status == 429
    assert errors.from_status(grpc.StatusCode.UNAVAILABLE, "down").headers == {"Retry-After": "1"}
    assert errors.from_status(grpc.StatusCode.UNAUTHENTICATED, "no").status == 401
    assert errors.from_status(grpc.StatusCode.DEADLINE_EXCEEDED, "late").status == 504
    assert errors.from_status(grpc.StatusCode.INTERNAL, "bug").status == 500
    assert errors.not_found_model("x").status == 404
    from kimivl_contract.errors import Reason

    long = errors.from_request_error(RequestError("the prompt is 9000 tokens", reason=Reason.CONTEXT_EXCEEDED))
    assert long.status == 400 and long.body()["error"]["code"] == "context_length_exceeded"
    upstream = errors.from_status(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is 9000 tokens",
                                  reason=Reason.CONTEXT_EXCEEDED)  # found by the inference tier
    assert upstream.status == 400 and upstream.body()["error"]["code"] == "context_length_exceeded"


def _result(thinking=3, answer=4, reason=types_pb2.FINISH_REASON_LENGTH):
    return types_pb2.GenerationResult(finish_reason=reason, usage=types_pb2.Usage(
        prompt_tokens=10, cached_prompt_tokens=2, image_tokens=6, thinking_tokens=thinking, answer_tokens=answer))


def test_completion_json():
    body = render.completion("chatcmpl-1", "kimi", 5, "hmm", "yes", _result(), show_reasoning=True)
    msg = body["choices"][0]["message"]
    assert msg["content"] == "yes" and msg["reasoning_content"] == msg["reasoning"] == "hmm"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17,
                             "prompt_tokens_details": {"cached_tokens": 2, "image_tokens": 6},
                             "completion_tokens_details": {"reasoning_tokens": 3}}
    hidden = render.completion("c", "kimi", 5, "", "", _result(answer=0), show_reasoning=False)["choices"][0]
    assert hidden["message"]["content"] is None and "reasoning" not in hidden["message"]


def _events(raw: bytes) -> list:
    assert raw.endswith(b"\n\n")
    out = []
    for event in raw.decode().split("\n\n")[:-1]:
        assert event.startswith("data: ")
        data = event[6:]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_stream_chunks():
    r = render.StreamRenderer("chatcmpl-1", "kimi", include_usage=True, created=5)
    raw = r.delta("th", "") + r.delta("", "") + r.delta("in", "an") + r.delta("", "swer") + r.end(_result())
    ev = _events(raw)
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert all(c["id"] == "chatcmpl-1" and c["object"] == "chat.completion.chunk" and c["model"] == "kimi"
               and c["created"] == 5 for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert deltas[1] == {"reasoning_content": "th", "reasoning": "th"}
    assert deltas[2] == {"reasoning_content": "in", "reasoning": "in", "content": "an"}
    assert deltas[3] == {"content": "swer"} and deltas[4] == {}
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 3
    plain = _events(render.StreamRenderer("c", "kimi", include_usage=False).end(_result()))
    assert len(plain) == 3 and "usage" not in plain[0] and plain[1]["choices"][0]["finish_reason"] == "length"
    err = _events(render.StreamRenderer.error(errors.from_status(grpc.StatusCode.UNAVAILABLE, "down").body()))
    assert err[0]["error"]["message"] == "down" and err[1] == "[DONE]"
