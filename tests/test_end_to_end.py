"""Both tiers as real processes on loopback with real vLLM (CPU engine) and the tiny model."""
from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from conftest import ENGINE_ENV, ROOT
from kimivl.client import AsyncClient, Client, InvalidArgument
from kimivl.v1 import inference_pb2, inference_pb2_grpc, types_pb2
from prepared_cases import mutations

pytestmark = pytest.mark.engine


def jpeg(arr, quality=90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


ASTRONAUT = jpeg(skdata.astronaut())
COFFEE = jpeg(skdata.coffee())
CHELSEA = jpeg(skdata.chelsea())
GREEDY = {"temperature": 0.0, "max_tokens": 24, "ignore_eos": True}


def collect(client, parts, **kw):
    return client.chat(parts, sampling=GREEDY, **kw)


def test_streamed_chat_with_two_interleaved_images(front_door):
    with Client(front_door.target, timeout_s=300) as c:
        events = list(c.stream(["Compare", ASTRONAUT, "with", COFFEE, "briefly."], sampling=GREEDY))
    deltas, result = events[:-1], events[-1].result
    assert result is not None and all(e.result is None for e in deltas)
    ids = [t for e in deltas for t in e.token_ids]
    assert len(ids) == 24
    assert result.finish_reason == types_pb2.FINISH_REASON_LENGTH
    u = result.usage
    assert u.image_tokens == 38 * 38 // 4 + 30 * 44 // 4
    assert u.prompt_tokens > u.image_tokens
    assert u.thinking_tokens + u.answer_tokens == 24
    t = result.timings
    assert t.preprocess_ms > 0 and t.total_ms >= t.time_to_first_token_ms > 0


def _run_vllm_reference(tmp_path, cases):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "vllm_reference.py"), str(ROOT / "models" /
                           "kimi-vl-tiny"), str(path)], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, **ENGINE_ENV})
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(cases), proc.stdout[-3000:] + proc.stderr[-5000:]
    return results


def test_equal_to_vllms_own_path(front_door, tmp_path):
    """Greedy token ids through our two tiers == vLLM's own path (its image loader and HF
    processor inside the engine); another image changes them."""
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    big = jpeg(np.asarray(Image.fromarray(skdata.astronaut()).resize((2400, 2200))))  # rescaled to the token limit
    cases = [
        [{"text": "What is in this picture?"}, {"image_b64": b64(ASTRONAUT)}],
        [{"image_b64": b64(COFFEE)}, {"text": "and"}, {"image_b64": b64(CHELSEA)}, {"text": "compare them"}],
        [{"text": "Describe"}, {"image_b64": b64(big)}],
        [{"text": "What is in this picture?"}, {"image_b64": b64(CHELSEA)}],
    ]
    ref = _run_vllm_reference(tmp_path, [{"parts": c, "max_tokens": 24} for c in cases])
    with Client(front_door.target, timeout_s=600) as c:
        ours = []
        for case in cases:
            parts = [p["text"] if "text" in p else base64.b64decode(p["image_b64"]) for p in case]
            ours.append(collect(c, parts))
    for i, (r, o) in enumerate(zip(ref, ours, strict=True)):
        assert o.usage.prompt_tokens == r["prompt_len"], f"case {i}: prompt length differs"
        assert o.token_ids == r["token_ids"], f"case {i}: greedy ids differ"
    # Same text, another image: the output must change (the model looks at the image).
    assert ours[0].token_ids != ours[3].token_ids


async def test_async_client_and_hidden_thinking(front_door):
    async with AsyncClient(front_door.target, timeout_s=300) as c:
        r = await c.chat(["Hi", COFFEE], sampling=GREEDY, exclude_thinking=True)
    assert r.thinking == ""
    assert r.usage.thinking_tokens + r.usage.answer_tokens == 24
    assert len(r.token_ids) == 24


def test_text_fields_are_the_decoded_tokens_minus_markers(front_door, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model), trust_remote_code=True)
    with Client(front_door.target, timeout_s=300) as c:
        r = c.chat(["Think about", ASTRONAUT], sampling={"temperature": 0.0, "max_tokens": 40})
    full = tok.decode(r.token_ids, skip_special_tokens=True)
    assert r.thinking + r.answer == full.replace("◁think▷", "").replace("◁/think▷", "")
    assert r.usage.thinking_tokens + r.usage.answer_tokens == len(r.token_ids)


def _prepared(front_door, parts):
    with Client(front_door.target, timeout_s=120) as c:
        return c.preprocess(parts).prompt


def _generate(target, prompt, **sampling):
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 256 << 20)]) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        req = inference_pb2.GenerateRequest(prompt=prompt, sampling=types_pb2.SamplingParameters(
            **{"temperature": 0.0, "max_tokens": 4, **sampling}))
        return list(stub.Generate(req, timeout=300))


def test_inference_validates_before_the_engine_and_keeps_serving(front_door, inference_server):
    prompt = _prepared(front_door, ["Look", COFFEE])
    good = _generate(inference_server.target, prompt)
    assert good[-1].WhichOneof("event") == "result"
    for name, mutate, fragment in mutations(prompt):
        with pytest.raises(grpc.RpcError) as e:
            _generate(inference_server.target, mutate())
        assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), name
        assert fragment in e.value.details(), f"{name}: {e.value.details()}"
    with pytest.raises(grpc.RpcError) as e:
        _generate(inference_server.target, prompt, max_tokens=9000)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceeds the context" in e.value.details()
    # The engine survived every one of them.
    assert [m.delta.token_ids for m in _generate(inference_server.target, prompt)] == \
        [m.delta.token_ids for m in good]


def test_uint8_and_bfloat16_patches_give_the_same_generation(front_door, inference_server):
    """Raw pixels normalized by the inference tier == patches normalized by the front door."""
    with Client(front_door.target, timeout_s=120) as c:
        as_uint8 = c.preprocess(["Look", COFFEE], dtype=types_pb2.TENSOR_DTYPE_UINT8).prompt
        as_bf16 = c.preprocess(["Look", COFFEE], dtype=types_pb2.TENSOR_DTYPE_BFLOAT16).prompt
    assert as_uint8.images[0].pixel_values.dtype == types_pb2.TENSOR_DTYPE_UINT8
    assert len(as_uint8.images[0].pixel_values.data) * 2 == len(as_bf16.images[0].pixel_values.data)
    # The ids, not their grouping into deltas (a busy engine coalesces tokens into fewer deltas).
    ids = [[t for m in _generate(inference_server.target, p, max_tokens=12) if m.WhichOneof("event") == "delta"
            for t in m.delta.token_ids] for p in (as_uint8, as_bf16)]
    assert ids[0] == ids[1] and len(ids[0]) == 12


def test_front_door_takes_a_prepared_prompt_and_rehashes_it(front_door):
    prompt = _prepared(front_door, ["Look", COFFEE])
    with Client(front_door.target, timeout_s=300) as c:
        direct = collect(c, ["Look", COFFEE])
        from kimivl.v1 import chat_pb2
        forged = types_pb2.PreparedPrompt()
        forged.CopyFrom(prompt)
        forged.images[0].content_hash = "someone-elses-image"
        r = c.chat(request=chat_pb2.ChatRequest(prepared_prompt=forged,
                                                sampling=types_pb2.SamplingParameters(**GREEDY)))
    assert r.token_ids == direct.token_ids
    bad = types_pb2.PreparedPrompt()
    bad.CopyFrom(prompt)
    bad.images[0].placeholder_length += 4
    with Client(front_door.target, timeout_s=60) as c, pytest.raises(InvalidArgument, match="placeholder_length"):
        c.chat(request=chat_pb2.ChatRequest(prepared_prompt=bad))


def _ids(target, prompt) -> list[int]:
    return [t for m in _generate(target, prompt, max_tokens=12, ignore_eos=True)
            if m.WhichOneof("event") == "delta" for t in m.delta.token_ids]


def _with_hash(prompt, content_hash: str):
    out = types_pb2.PreparedPrompt()
    out.CopyFrom(prompt)
    out.images[0].content_hash = content_hash
    return out


def test_a_forged_content_hash_neither_reads_nor_plants_cached_results(front_door, inference_server):
    """The inference tier keys the engine's caches by an identity it derives from the tensor, so a
    caller that reaches it directly cannot get image A's cached result for image B's pixels, nor
    plant B's result under the hash of an image C that an honest chat then sends."""
    side = jpeg(np.ascontiguousarray(skdata.astronaut()[:, ::-1]))  # same size as ASTRONAUT: same grid
    with Client(front_door.target, timeout_s=120) as c:  # uint8, as the front door's chats send them
        a, b = (c.preprocess(["Look", img], dtype=types_pb2.TENSOR_DTYPE_UINT8).prompt for img in (ASTRONAUT, side))
    assert (a.images[0].grid_height, a.images[0].grid_width) == (b.images[0].grid_height, b.images[0].grid_width)
    ids_a, ids_b = _ids(inference_server.target, a), _ids(inference_server.target, b)
    assert ids_a != ids_b  # the image matters to the tiny model, so a cache mix-up would show
    # Read: B's pixels under A's hash, right after A filled the caches.
    assert _ids(inference_server.target, a) == ids_a
    assert _ids(inference_server.target, _with_hash(b, a.images[0].content_hash)) == ids_b
    # Plant: A's pixels under the hash the front door gives C (= B here), then the honest chat.
    _ids(inference_server.target, _with_hash(a, b.images[0].content_hash))
    with Client(front_door.target, timeout_s=300) as c:
        honest = c.chat(["Look", side], sampling={"temperature": 0.0, "max_tokens": 12, "ignore_eos": True})
    assert honest.token_ids == ids_b


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    vals = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(vals)


def test_cancel_mid_stream_leaves_no_request_in_the_engine(front_door, inference_server):
    port = int(inference_server.args[inference_server.args.index("--metrics-port") + 1])
    with Client(front_door.target, timeout_s=300) as c:
        stream = c.stream(["Go on and on", COFFEE], sampling={"temperature": 0.0, "max_tokens": 3000,
                                                               "ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()  # cancels the call
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        running = _metric(port, "vllm:num_requests_running") + _metric(port, "vllm:num_requests_waiting")
        ours = _metric(port, "kimivl_requests_running") + _metric(port, "kimivl_requests_waiting")
        if running == 0 and ours == 0:
            break
        time.sleep(0.5)
    assert running == 0 and ours == 0, (running, ours)
    assert _metric(port, "kimivl_time_to_first_token_seconds_count") >= 1
