"""The README's examples, run against the real tiers so the docs can't drift."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import grpc
import pytest
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from conftest import BIN, ROOT

pytestmark = pytest.mark.engine
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def test_python_example_runs(front_door):
    (code,) = [b for b in blocks("python") if "kimivl.client" in b]
    code = code.replace("localhost:50051", front_door.target)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1].split()
    assert last[0] == "length" and int(last[1]) + int(last[2]) == 32


def test_terminal_example_runs(front_door):
    (line,) = [ln for b in blocks("bash") for ln in b.splitlines() if "kimivl chat" in ln]
    argv = shlex.split(line.replace("localhost:50051", front_door.target))
    argv[0] = str(BIN / "kimivl")
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    counts = re.search(r"thinking (\d+) · answer (\d+)", proc.stdout)
    assert counts and int(counts.group(1)) + int(counts.group(2)) == 32, proc.stdout


def test_grpcurl_example_json_is_a_valid_request_through_reflection(front_door):
    """What grpcurl does: resolve the method by reflection, parse the README's JSON into it,
    and call it."""
    (block,) = [b for b in blocks("bash") if "grpcurl" in b]
    payload = json.loads(re.search(r"-d '(.*?)'", block, re.S).group(1))
    method = re.search(r"(kimivl\.v1\.\w+)/(\w+)", block)
    with grpc.insecure_channel(front_door.target) as ch:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
        service = pool.FindServiceByName(method.group(1))
        m = service.FindMethodByName(method.group(2))
        req_cls = message_factory.GetMessageClass(m.input_type)
        resp_cls = message_factory.GetMessageClass(m.output_type)
        request = json_format.ParseDict(payload, req_cls())
        call = ch.unary_stream(f"/{service.full_name}/{m.name}", request_serializer=req_cls.SerializeToString,
                               response_deserializer=resp_cls.FromString)
        events = [json_format.MessageToDict(e) for e in call(request, timeout=300)]
    assert "result" in events[-1]
    usage = events[-1]["result"]["usage"]
    assert int(usage.get("thinkingTokens", 0)) + int(usage.get("answerTokens", 0)) <= 16


def _openai_example(code: str, front_door) -> str:
    return (code.replace("http://localhost:8000", front_door.http)
            .replace("Kimi-VL-A3B-Thinking-2506", "kimi-vl-tiny"))


def test_curl_example_runs(front_door):
    (block,) = [b for b in blocks("bash") if "/v1/chat/completions" in b]
    proc = subprocess.run(["bash", "-c", _openai_example(block, front_door)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "KIMIVL_API_KEY": ""})
    assert proc.returncode == 0, proc.stderr
    reply = json.loads(proc.stdout)
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
    assert 0 < reply["usage"]["completion_tokens"] <= 32 and reply["usage"]["prompt_tokens_details"]["image_tokens"] > 0


def test_openai_sdk_example_runs(front_door):
    (code,) = [b for b in blocks("python") if "from openai import OpenAI" in b]
    proc = subprocess.run([sys.executable, "-c", _openai_example(code, front_door)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    completion, reasoning = map(int, proc.stdout.strip().splitlines()[-1].split())
    assert 0 < completion <= 64 and 0 <= reasoning <= completion
