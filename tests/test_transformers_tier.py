"""The inference tier with --engine transformers, as a real process with vLLM made unimportable
(tests/no_vllm.py), against the vLLM tier on the same tiny model.

Equality: greedy token ids from the two engines are identical for text only, one image and two
interleaved images, both in float32 on CPU, fed the same prepared prompt. No tolerance is
applied to the ids; the two implementations' log-probabilities differ by about 2e-5 (float32
rounding in different kernels), so arg-max agrees unless two logits are that close, which the
cases here do not hit. (In bfloat16 the rounding is ~1e-2 and ties between the tiny random
model's logits make greedy ids diverge after a few tokens, which is why the comparison is in
float32.) vLLM's CPU rotary kernel needs the fix in kimivl_inference.vllm_cpu_rope for this.
"""
from __future__ import annotations

import re
import sys
import time
import urllib.request

import grpc
import pytest

from conftest import ROOT, ServerProcess, free_port, start_inference, start_preprocess, tiny_model_dir
from kimivl.client import Client
from kimivl.v1 import inference_pb2, inference_pb2_grpc, types_pb2
from prepared_cases import mutations
from test_end_to_end import ASTRONAUT, CHELSEA, COFFEE

pytestmark = pytest.mark.engine


class NoVllmServer(ServerProcess):
    """The tier through tests/no_vllm.py: `kimivl` with vLLM unimportable."""

    def start(self) -> None:
        self.cmd = [sys.executable, str(ROOT / "tests" / "no_vllm.py"), "serve", self.tier, *self.args]
        super().start()


@pytest.fixture(scope="module")
def hf_tier(tiny_model):
    port = free_port()
    srv = NoVllmServer("inference-transformers", [
        "inference", "--engine", "transformers", "--model", str(tiny_model_dir()), "--host", "127.0.0.1",
        "--port", str(port), "--metrics-port", str(free_port()), "--device", "cpu", "--dtype", "float32",
        "--max-model-len", "8192", "--limit-mm-per-prompt", "8", "--max-num-seqs", "4", "--drain-timeout-s", "20"],
        port)
    try:
        srv.wait_serving()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def vllm_f32(tiny_model):
    srv = start_inference(extra=["--dtype", "float32", "--no-prefix-caching"])
    try:
        srv.wait_serving()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def hf_front(hf_tier):
    srv = start_preprocess(hf_tier.target)
    try:
        srv.wait_serving(60)
        yield srv
    finally:
        srv.stop()


def _generate(target, prompt, **sampling):
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 256 << 20)]) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        req = inference_pb2.GenerateRequest(prompt=prompt, sampling=types_pb2.SamplingParameters(
            **{"temperature": 0.0, "max_tokens": 4, **sampling}))
        return list(stub.Generate(req, timeout=600))


def _ids(msgs):
    return [t for m in msgs if m.WhichOneof("event") == "delta" for t in m.delta.token_ids]


CASES = {
    "text only": ["Tell me what you know about the quick brown fox."],
    "one image": ["What is in this picture?", ASTRONAUT],
    "two interleaved images": [COFFEE, "and", CHELSEA, "compare them"],
}


def test_greedy_ids_equal_vllms(hf_front, hf_tier, vllm_f32):
    with Client(hf_front.target, timeout_s=120) as c:
        prompts = {name: c.preprocess(parts).prompt for name, parts in CASES.items()}
    ours = {}
    for name, prompt in prompts.items():
        ours[name] = _ids(_generate(hf_tier.target, prompt, max_tokens=24, ignore_eos=True))
        theirs = _ids(_generate(vllm_f32.target, prompt, max_tokens=24, ignore_eos=True))
        assert len(ours[name]) == 24
        assert ours[name] == theirs, f"{name}: greedy ids differ"
    # Meaningful: the image changes the output.
    with Client(hf_front.target, timeout_s=120) as c:
        other = c.preprocess(["What is in this picture?", COFFEE]).prompt
    assert _ids(_generate(hf_tier.target, other, max_tokens=24, ignore_eos=True)) != ours["one image"]


def test_chat_through_the_front_door(hf_front):
    with Client(hf_front.target, timeout_s=300) as c:
        events = list(c.stream(["Compare", ASTRONAUT, "with", COFFEE, "briefly."],
                               sampling={"temperature": 0.0, "max_tokens": 16, "ignore_eos": True}))
    result = events[-1].result
    assert result.finish_reason == types_pb2.FINISH_REASON_LENGTH
    assert result.usage.image_tokens == 38 * 38 // 4 + 30 * 44 // 4
    assert result.usage.thinking_tokens + result.usage.answer_tokens == 16
    assert sum(len(e.token_ids) for e in events[:-1]) == 16


def test_validation_before_the_engine_and_it_keeps_serving(hf_front, hf_tier):
    with Client(hf_front.target, timeout_s=120) as c:
        prompt = c.preprocess(["Look", COFFEE]).prompt
    good = _generate(hf_tier.target, prompt)
    for name, mutate, fragment in mutations(prompt):
        with pytest.raises(grpc.RpcError) as e:
            _generate(hf_tier.target, mutate())
        assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), name
        assert fragment in e.value.details(), f"{name}: {e.value.details()}"
    with pytest.raises(grpc.RpcError) as e:
        _generate(hf_tier.target, prompt, max_tokens=9000)
    assert "exceeds the context" in e.value.details()
    assert _ids(_generate(hf_tier.target, prompt)) == _ids(good)


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_cancel_mid_stream_frees_the_engine(hf_front, hf_tier):
    port = int(hf_tier.args[hf_tier.args.index("--metrics-port") + 1])
    with Client(hf_front.target, timeout_s=300) as c:
        stream = c.stream(["Go on and on", COFFEE], sampling={"temperature": 0.0, "max_tokens": 3000,
                                                               "ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        busy = sum(_metric(port, n) for n in ("kimivl_engine_requests_running", "kimivl_engine_requests_waiting",
                                              "kimivl_requests_running", "kimivl_requests_waiting"))
        if busy == 0:
            break
        time.sleep(0.5)
    assert busy == 0


def test_stop_strings_and_seeds_reach_the_engine(hf_front):
    greedy = {"temperature": 0.0, "max_tokens": 16, "ignore_eos": True}
    with Client(hf_front.target, timeout_s=300) as c:
        full = c.chat(["Hello", CHELSEA], sampling=greedy)
        text = full.thinking + full.answer
        stop = text[len(text) // 2:len(text) // 2 + 5]
        cut = c.chat(["Hello", CHELSEA], sampling={**greedy, "stop": [stop]})
        sampled = [c.chat(["Hello", CHELSEA], sampling={"temperature": 1.0, "seed": s, "max_tokens": 8,
                                                         "ignore_eos": True}).token_ids for s in (1, 1, 2)]
    assert cut.finish_reason == "stop" and len(cut.token_ids) < 16
    assert cut.thinking + cut.answer == text[: text.index(stop)]
    assert sampled[0] == sampled[1] != sampled[2]
