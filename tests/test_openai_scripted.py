"""The OpenAI port of a real front door (a process on loopback) in front of a scripted inference
tier (tests/fake_inference.py), through the official ``openai`` SDK: what the tiny model cannot
show (thinking: it never emits the markers) or not on time (a stream that lasts through a
drain, an error in the middle of a stream, load shedding upstream). The real engine's side is
in test_openai_http.py."""
from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from conftest import start_preprocess
from fake_inference import FakeInference, thinking_then_answer
from kimivl.v1 import types_pb2

MODEL = "kimi-vl-tiny"
THINKING = ["Let me ", "look. ", "A cat."]
ANSWER = ["It ", "is ", "a cat."]


@pytest.fixture(scope="module")
def fake():
    with FakeInference(thinking_then_answer(THINKING, ANSWER)) as f:
        yield f


@pytest.fixture(scope="module")
def door(fake):
    srv = start_preprocess(fake.target, extra=["--served-model-name", MODEL, "kimi"])
    try:
        srv.wait_serving(120)
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def sdk(door, fake):
    fake.replies, fake.delay_s, fake.error = thinking_then_answer(THINKING, ANSWER), 0.0, None
    with openai.OpenAI(base_url=door.http + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def ask(sdk, **kw):
    kw.setdefault("messages", [{"role": "user", "content": "What is it?"}])
    return sdk.chat.completions.create(model=kw.pop("model", MODEL), **kw)


def test_thinking_apart_in_the_whole_reply(sdk, fake):
    r = ask(sdk)
    m = r.choices[0].message
    assert m.content == "".join(ANSWER)
    assert m.reasoning_content == m.reasoning == "".join(THINKING)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(THINKING) + len(ANSWER)
    assert r.usage.completion_tokens_details.reasoning_tokens == len(THINKING)
    assert r.usage.prompt_tokens == 40 and r.usage.prompt_tokens_details.cached_tokens == 8


def test_thinking_apart_in_the_stream(sdk):
    chunks = list(ask(sdk, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and deltas[0].content == ""
    reasoning = [d.reasoning_content for d in deltas if getattr(d, "reasoning_content", None)]
    assert reasoning == [getattr(d, "reasoning", None) for d in deltas if getattr(d, "reasoning", None)]
    assert "".join(reasoning) == "".join(THINKING)
    assert "".join(d.content or "" for d in deltas) == "".join(ANSWER)
    both = [d for d in deltas if getattr(d, "reasoning", None) and d.content]
    assert len(both) == 1 and both[0].reasoning == THINKING[-1] and both[0].content == ANSWER[0]
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == len(THINKING)


def test_fields_reach_the_inference_tier(sdk, fake):
    n = len(fake.requests)
    r = ask(sdk, model="kimi", max_completion_tokens=33, temperature=0.25, top_p=0.5, seed=9, stop=["x", "y"],
            frequency_penalty=0.5, presence_penalty=-0.5, user="u-1",
            extra_body={"top_k": 7, "repetition_penalty": 1.2, "ignore_eos": True, "thinking_token_budget": 5,
                        "include_reasoning": False, "request_id": "req-42"})
    g = fake.requests[n]
    s, t = g.sampling, g.thinking
    assert (s.max_tokens, s.top_k, s.seed, list(s.stop), s.ignore_eos) == (33, 7, 9, ["x", "y"], True)
    assert (s.temperature, s.top_p, s.frequency_penalty, s.presence_penalty) == (0.25, 0.5, 0.5, -0.5)
    assert s.repetition_penalty == pytest.approx(1.2)
    assert t.max_thinking_tokens == 5 and t.exclude_thinking
    assert g.request_id == "req-42" and r.id == "chatcmpl-req-42" and r.model == "kimi"
    assert not hasattr(r.choices[0].message, "reasoning") or r.choices[0].message.reasoning is None


def test_prompt_reaches_the_inference_tier_as_the_grpc_port_builds_it(sdk, door, fake):
    from kimivl.client import Client

    n = len(fake.requests)
    ask(sdk, messages=[{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                       {"role": "assistant", "content": "Hello.", "reasoning_content": "greet back"},
                       {"role": "user", "content": "Bye"}])
    with Client(door.target, timeout_s=60) as c:
        c.chat("Bye", messages=[{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": ["Hello."]}],
               system="Be brief.")
    http_prompt, grpc_prompt = fake.requests[n].prompt, fake.requests[n + 1].prompt
    assert list(http_prompt.token_ids) == list(grpc_prompt.token_ids) and len(http_prompt.token_ids) > 5


def test_an_error_after_the_first_token_is_an_sse_error_event(sdk, fake):
    fake.error = (grpc.StatusCode.INTERNAL, "engine died")
    fake.replies = thinking_then_answer(THINKING, ANSWER)[:2]
    got = []
    with pytest.raises(openai.APIError) as e:
        for c in ask(sdk, stream=True):
            got.append(c)
    assert "engine died" in str(e.value) and got


@pytest.mark.parametrize("code, status, cls", [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, openai.RateLimitError),
    (grpc.StatusCode.UNAVAILABLE, 503, openai.InternalServerError),
    (grpc.StatusCode.INVALID_ARGUMENT, 400, openai.BadRequestError),
])
def test_an_error_before_the_first_token_keeps_its_status(sdk, fake, code, status, cls):
    fake.replies, fake.error = [], (code, "sampling.max_tokens: over what the engine allows")
    for stream in (False, True):
        with pytest.raises(cls) as e:
            r = ask(sdk, stream=stream, max_tokens=5)
            list(r) if stream else None
        assert e.value.status_code == status
        if status == 503:  # not the tier's own words (no kimivl ErrorInfo): gRPC's may name addresses
            assert e.value.body["message"] == "inference tier unavailable; retry later"
        else:
            assert e.value.body["message"].endswith("max_tokens: over what the engine allows")
        if status == 400:
            assert e.value.body["param"] == "max_tokens"
        if status == 503:
            assert e.value.response.headers["Retry-After"] == "1"


def test_a_client_that_leaves_cancels_the_inference_call(sdk, fake):
    fake.delay_s = 0.2
    fake.replies = thinking_then_answer(THINKING, ANSWER * 100)
    before = fake.cancelled
    stream = ask(sdk, stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30  # generous: a loaded 2-core CI box; the stream alone would last 60 s
    while fake.cancelled == before:
        assert time.monotonic() < deadline, "the inference call went on after its client left"
        time.sleep(0.1)


def test_drain_finishes_streams_refuses_new_chats_and_reports_not_ready(fake):
    fake.replies, fake.delay_s, fake.error = thinking_then_answer(THINKING, ANSWER * 10), 0.1, None
    door = start_preprocess(fake.target, extra=["--drain-timeout-s", "30"])
    try:
        door.wait_serving(120)
        c = openai.OpenAI(base_url=door.http + "/v1", api_key="unused", max_retries=0, timeout=60)
        it = iter(ask(c, stream=True))
        chunks = [next(it)]
        door.proc.send_signal(signal.SIGTERM)
        rest = threading.Thread(target=lambda: chunks.extend(it))
        rest.start()
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(door.http + "/ready", timeout=10)
            except urllib.error.HTTPError as e:
                assert e.code == 503 and json.loads(e.read())["status"] == "NOT_SERVING"
                break
            assert time.monotonic() < deadline, "/ready never reported draining"
            time.sleep(0.05)
        assert urllib.request.urlopen(door.http + "/health", timeout=10).status == 200, "draining is not dead"
        with pytest.raises(openai.InternalServerError) as e:
            ask(c)
        assert e.value.status_code == 503 and "draining" in e.value.body["message"]
        rest.join(60)
        assert chunks[-1].choices[0].finish_reason == "stop", "the stream in flight was cut"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "".join(ANSWER * 10)
        assert door.proc.wait(60) == 0
    finally:
        door.stop()


def test_penalty_fields_are_in_the_contract_and_checked_on_both_tiers():
    from kimivl_contract.errors import RequestError
    from kimivl_contract.limits import check_sampling

    ok = types_pb2.SamplingParameters(frequency_penalty=-2, presence_penalty=2)
    check_sampling(ok, types_pb2.ThinkingOptions())
    for field in ("frequency_penalty", "presence_penalty"):
        with pytest.raises(RequestError, match=rf"sampling.{field} is 2.5; allowed range is \[-2, 2\]"):
            check_sampling(types_pb2.SamplingParameters(**{field: 2.5}), types_pb2.ThinkingOptions())


def test_penalties_become_vllm_sampling_params():
    from kimivl_inference.generation import sampling_params

    p = sampling_params(types_pb2.SamplingParameters(frequency_penalty=0.5, presence_penalty=-1.5), 10)
    assert (p.frequency_penalty, p.presence_penalty) == (0.5, -1.5)
    p = sampling_params(types_pb2.SamplingParameters(), 10)
    assert (p.frequency_penalty, p.presence_penalty) == (0.0, 0.0)
