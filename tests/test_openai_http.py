"""The OpenAI-compatible HTTP port against the real tiers (real vLLM on CPU, the tiny model),
driven by the official ``openai`` SDK (sync, async, streaming): the same pipeline and the same
answers as the gRPC port, the same refusals with the same messages (paths in the client's
terms), bounded bodies, and a client that leaves cancelling its engine request."""
from __future__ import annotations

import asyncio
import base64
import http.client
import json
import re
import socket
import time
import urllib.request
from urllib.parse import urlsplit

import openai
import pytest

from imagedata import garbage_bytes, photo_jpeg, png_header_only, sized_png
from kimivl.client import Client, InvalidArgument, KimiVLError
from kimivl.v1 import types_pb2

pytestmark = pytest.mark.engine

MODEL = "kimi-vl-tiny"
GREEDY = {"temperature": 0.0, "max_completion_tokens": 16, "extra_body": {"ignore_eos": True}}


def uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


PHOTO = photo_jpeg("astronaut")


def image_chat(text: str = "Describe", image: bytes = PHOTO) -> list[dict]:
    return [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": uri(image)}}]}]


def grpc_parts(text: str = "Describe", image: bytes = PHOTO):
    return dict(content=[text, image], system="You are terse.")


@pytest.fixture(scope="module")
def sdk(front_door):
    with openai.OpenAI(base_url=front_door.http + "/v1", api_key="unused", max_retries=0, timeout=300) as c:
        yield c


def metric(url: str, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        if labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total


# --------------------------------------------------------------------------- same pipeline
def test_chat_equals_the_grpc_port(sdk, front_door):
    r = sdk.chat.completions.create(model=MODEL, messages=image_chat(), **GREEDY)
    with Client(front_door.target, timeout_s=300) as c:
        g = c.chat(**grpc_parts(), sampling={"temperature": 0.0, "max_tokens": 16, "ignore_eos": True})
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert (choice.message.content or "") == g.answer
    assert (choice.message.reasoning_content or "") == (choice.message.reasoning or "") == g.thinking
    assert r.usage.prompt_tokens == g.usage.prompt_tokens and r.usage.completion_tokens == 16
    assert r.usage.completion_tokens_details.reasoning_tokens == g.usage.thinking_tokens
    assert r.usage.prompt_tokens_details.image_tokens == g.usage.image_tokens > 0
    assert r.model == MODEL and r.id.startswith("chatcmpl-") and r.object == "chat.completion"


def test_stream_equals_the_whole_reply(sdk):
    whole = sdk.chat.completions.create(model=MODEL, messages=image_chat(), **GREEDY)
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=image_chat(), stream=True,
                                              stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning", None) or "" for c in chunks if c.choices)
    assert text == (whole.choices[0].message.content or "")
    assert reasoning == (whole.choices[0].message.reasoning or "")
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


async def test_async_client_concurrent_streams(front_door):
    async with openai.AsyncOpenAI(base_url=front_door.http + "/v1", api_key="unused", max_retries=0,
                                  timeout=300) as c:
        async def one(i):
            stream = await c.chat.completions.create(model=MODEL, messages=image_chat(f"Hi {i}"), stream=True,
                                                     max_tokens=8, temperature=0, stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True})
            return [ch async for ch in stream]

        streams = await asyncio.gather(*(one(i) for i in range(3)))
    # Batched together, greedy outputs may differ from one-at-a-time ones (CPU numerics): check each stream.
    assert len({s[0].id for s in streams}) == 3
    for chunks in streams:
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
        assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens_details.image_tokens > 0


def _tokens(text: str) -> list[str]:
    return re.findall(r"<\|[^|]+\|>|[^<]+", text or "")


def test_penalties_and_vllm_extras_reach_the_engine(sdk):
    def tokens(**kw):
        r = sdk.chat.completions.create(model=MODEL, messages=image_chat(), temperature=0, max_completion_tokens=24,
                                        extra_body={"ignore_eos": True, **kw.pop("extra", {})}, **kw)
        return _tokens(r.choices[0].message.content)

    base = tokens()
    distinct = len(set(base))
    assert distinct < len(base), "the greedy reply to this prompt repeats tokens (what the penalties act on)"
    for kw in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"extra": {"repetition_penalty": 3.0}}):
        assert len(set(tokens(**kw))) > distinct, kw
    for kw in ({"presence_penalty": -2.0}, {"frequency_penalty": -2.0}):
        assert len(set(tokens(**kw))) <= distinct, kw
    assert tokens(seed=7) == base, "a seed does not change greedy decoding"
    later = next(t for t in base[1:] if t != base[0])
    r = sdk.chat.completions.create(model=MODEL, messages=image_chat(), temperature=0, max_completion_tokens=24,
                                    stop=[later])
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 24
    assert later not in (r.choices[0].message.content or "")


def test_models(sdk):
    assert [m.id for m in sdk.models.list()] == [MODEL]
    assert sdk.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-4o")


# --------------------------------------------------------------------------- refusals
def _grpc_error(front_door, content, **sampling) -> str:
    with Client(front_door.target, timeout_s=300) as c, pytest.raises(KimiVLError) as e:
        c.chat(content, sampling=sampling or None)
    return e.value.details


def _status_error(fn) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as e:
        fn()
    return e.value


@pytest.mark.parametrize("case", ["bad_base64", "not_an_image", "private_url", "file_url", "too_many_pixels"])
def test_bad_images_have_the_grpc_ports_messages(sdk, front_door, case):
    url = {"bad_base64": "data:image/png;base64,@@@@", "not_an_image": uri(garbage_bytes()),
           "private_url": "http://127.0.0.1:9/a.jpg", "file_url": "file:///etc/passwd",
           "too_many_pixels": uri(png_header_only(20000, 10000), "image/png")}[case]
    e = _status_error(lambda: sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
        {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": url}}]}], max_tokens=4))
    body = e.body  # the SDK hands over {"error": ...}'s inside
    assert body["param"] == "messages[0].content[1].image_url.url", body
    image = {"url": url} if not url.startswith("data:") else {"data_uri": url}
    details = _grpc_error(front_door, ["x", types_pb2.Image(**image)])
    grpc_path = re.match(r"conversation\.messages\[0\]\.content\[1\]\.image(\.url|\.data_uri)?", details).group(0)
    assert body["message"] == "messages[0].content[1].image_url.url" + details[len(grpc_path):]
    assert e.status_code == (413 if case == "too_many_pixels" else 400)


def test_bad_parameters_have_the_grpc_ports_messages(sdk, front_door):
    cases = [({"temperature": 5}, {"temperature": 5}, "temperature"),
             ({"top_p": 0}, {"top_p": 0}, "top_p"),
             ({"frequency_penalty": 3}, {"frequency_penalty": 3}, "frequency_penalty"),
             ({"max_completion_tokens": 0}, {"max_tokens": 0}, "max_completion_tokens"),
             ({"max_completion_tokens": 9000}, {"max_tokens": 9000}, "max_completion_tokens")]
    for openai_kw, grpc_kw, param in cases:
        e = _status_error(lambda kw=openai_kw: sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], **kw))
        assert isinstance(e, openai.BadRequestError), (param, e)
        body = e.body
        assert body["param"] == param, body
        details = _grpc_error(front_door, ["x"], **grpc_kw)
        assert body["message"] == details.replace("sampling.max_tokens", param).replace(f"sampling.{param}", param)
        # OpenAI's own code for a prompt plus its tokens past the context; others have none
        assert body["code"] == ("context_length_exceeded" if "exceeds the context" in details else None), body


def test_a_context_refusal_by_the_inference_tier_has_openais_code(inference_server):
    """A front door that believes in a longer context (16384) than the tier serves (8192): the
    inference tier refuses max_completion_tokens 9000 (CONTEXT_EXCEEDED in its ErrorInfo), and the
    HTTP answer carries OpenAI's code for it."""
    from conftest import start_preprocess

    door = start_preprocess(inference_server.target, extra=["--max-model-len", "16384"])
    try:
        door.wait_serving(60)
        with openai.OpenAI(base_url=door.http + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
            e = _status_error(lambda: c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_completion_tokens=9000))
    finally:
        door.stop()
    assert isinstance(e, openai.BadRequestError), e
    assert "8192" in e.body["message"] and e.body["code"] == "context_length_exceeded", e.body


@pytest.mark.parametrize("kw, param", [
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"extra_body": {"min_p": 0.2}}, "min_p"), ({"extra_body": {"frobnicate": True}}, "frobnicate"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
     "messages[0].content[0].type"),
])
def test_unsupported_fields_are_a_400_naming_them(sdk, kw, param):
    kw = {"messages": [{"role": "user", "content": "x"}], **kw}
    e = _status_error(lambda: sdk.chat.completions.create(model=MODEL, max_tokens=4, **kw))
    assert isinstance(e, openai.BadRequestError) and e.body["param"] == param, e.body
    assert param.split("[")[0].split(".")[0] in e.body["message"]


def test_unknown_model_and_route(sdk, front_door):
    e = _status_error(lambda: sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}]))
    assert isinstance(e, openai.NotFoundError) and e.body["code"] == "model_not_found"
    e = _status_error(lambda: sdk.completions.create(model=MODEL, prompt="x"))
    assert isinstance(e, openai.NotFoundError) and "no route for POST /v1/completions" in e.body["message"]


def test_too_many_images_is_413(sdk):
    tiny = {"type": "image_url", "image_url": {"url": uri(sized_png(28, 28), "image/png")}}
    e = _status_error(lambda: sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [tiny] * 9}], max_tokens=4))
    assert e.status_code == 413 and "the limit is 8" in e.body["message"]


def test_body_limit_is_checked_before_reading(front_door):
    host, port = urlsplit(front_door.http).hostname, urlsplit(front_door.http).port
    limit = (256 << 20) * 4 // 3 + (1 << 20)
    with socket.create_connection((host, port), timeout=30) as s:
        t = time.perf_counter()
        s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {limit + 1}\r\n\r\n".encode())  # and no body
        reply = s.recv(65536).decode()
        assert time.perf_counter() - t < 10
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=b"{not json", headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 400 and "not valid JSON" in json.loads(r.read())["error"]["message"]


# --------------------------------------------------------------------------- client gone
def _wait_engine_idle(inference_server, timeout_s: float = 20) -> float:
    t = time.monotonic()
    while time.monotonic() - t < timeout_s:
        running = metric(inference_server.metrics, "kimivl_requests_running")
        waiting = metric(inference_server.metrics, "kimivl_requests_waiting")
        if running == 0 and waiting == 0:
            return time.monotonic() - t
        time.sleep(0.2)
    raise AssertionError(f"the engine still has {running} running / {waiting} waiting requests")


def _wait_engine_busy(inference_server, timeout_s: float = 120) -> None:
    t = time.monotonic()
    while metric(inference_server.metrics, "kimivl_requests_running") < 1:
        assert time.monotonic() - t < timeout_s, "the request never started generating"
        time.sleep(0.1)


LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Go on"}], "max_completion_tokens": 6000,
        "ignore_eos": True, "temperature": 0}


def test_a_stream_whose_client_leaves_cancels_the_engine_request(sdk, front_door, inference_server):
    _wait_engine_idle(inference_server)
    stream = sdk.chat.completions.create(stream=True, **{k: v for k, v in LONG.items() if k != "ignore_eos"},
                                         extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert metric(inference_server.metrics, "kimivl_requests_running") == 1
    stream.close()
    assert _wait_engine_idle(inference_server) < 10


def test_a_non_streamed_request_whose_client_leaves_cancels_the_engine_request(front_door, inference_server):
    _wait_engine_idle(inference_server)
    host, port = urlsplit(front_door.http).hostname, urlsplit(front_door.http).port
    body = json.dumps(LONG).encode()
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    _wait_engine_busy(inference_server)  # nothing has been sent back: no write could notice
    before = metric(front_door.metrics, "kimivl_preprocess_http_requests_total", 'status="499"')
    s.close()
    assert _wait_engine_idle(inference_server) < 10
    deadline = time.monotonic() + 10
    while metric(front_door.metrics, "kimivl_preprocess_http_requests_total", 'status="499"') <= before:
        assert time.monotonic() < deadline, "the cancelled request was not counted"
        time.sleep(0.2)


def test_http_requests_are_counted_by_route_and_status(sdk, front_door):
    def count(status):
        return metric(front_door.metrics, "kimivl_preprocess_http_requests_total",
                      f'route="/v1/chat/completions",status="{status}"')

    ok, bad = count(200), count(400)
    sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=3)
    assert (count(200), count(400)) == (ok + 1, bad + 1)
    assert metric(front_door.metrics, "kimivl_preprocess_http_requests_total", 'route="/v1/models"') >= 1


def test_grpc_messages_for_the_same_mistake_are_unchanged(front_door):
    """Sanity: the gRPC port still answers as before (its messages are the reference above)."""
    with Client(front_door.target, timeout_s=60) as c, pytest.raises(InvalidArgument) as e:
        c.chat(["x"], sampling={"temperature": 5})
    assert e.value.details == "sampling.temperature is 5; allowed range is [0, 2]"
