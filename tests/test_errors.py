"""Errors programs can read: google.rpc details on every rejection, through the Python SDK, from a
real front door on loopback (its inference target has nothing listening); what grpcurl reads
through reflection; docs/errors.md's reason table kept whole."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor_pool import DescriptorPool
from google.rpc import status_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

import imagedata
from conftest import ROOT
from kimivl.client import Client, InvalidArgument, KimiVLError, ResourceExhausted, Unavailable
from kimivl.v1 import chat_pb2
from kimivl_contract.errors import MAX_MESSAGE_CHARS, Reason, clip


def test_an_out_of_range_field_names_its_path(front_door_alone):
    with Client(front_door_alone.target, timeout_s=30) as c, pytest.raises(InvalidArgument) as e:
        c.chat(["x"], sampling={"temperature": 9})
    assert e.value.reason == Reason.INVALID_ARGUMENT
    assert e.value.field_violations == [("sampling.temperature", e.value.details)]
    assert e.value.metadata["field"] == "sampling.temperature"


def test_a_bad_image_names_the_part_it_came_in(front_door_alone):
    with Client(front_door_alone.target, timeout_s=30) as c, pytest.raises(InvalidArgument) as e:
        c.chat(["look", imagedata.garbage_bytes()])
    assert [f for f, _ in e.value.field_violations] == ["conversation.messages[0].content[1].image"]


def test_a_limit_is_a_quota_failure_with_the_limit(front_door_alone):
    image = imagedata.photo_jpeg("coffee")
    with Client(front_door_alone.target, timeout_s=30) as c, pytest.raises(ResourceExhausted) as e:
        c.chat(["many", *[image] * 9])  # the fixture allows 8
    assert e.value.reason == Reason.LIMIT_EXCEEDED
    assert e.value.quota_violations and e.value.metadata["limit"] == "8"


def test_unavailable_says_when_to_retry(front_door_alone):
    with Client(front_door_alone.target, timeout_s=30) as c, pytest.raises(Unavailable) as e:
        c.chat(["anyone?"], sampling={"max_tokens": 2})
    assert e.value.reason == Reason.UNAVAILABLE and e.value.retry_after_s == pytest.approx(1.0)


def test_details_are_optional_for_the_sdk():
    err = KimiVLError(grpc.StatusCode.INTERNAL, "boom")
    assert err.reason is None and err.field_violations == [] and err.retry_after_s is None


def test_client_facing_messages_are_clipped_and_escaped():
    assert len(clip("x" * 50_000)) == MAX_MESSAGE_CHARS
    assert clip("bad\r\nline\x00") == "bad\\r\\nline\\x00"


def _doc_section(heading: str) -> str:
    doc = (ROOT / "docs" / "errors.md").read_text()
    return doc.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_every_reason_is_in_the_docs_table_and_nothing_else_is():
    listed = re.findall(r"^\| `([A-Z_]+)` \|", _doc_section("Reasons"), re.M)
    reasons = [v for k, v in vars(Reason).items() if not k.startswith("_")]
    assert sorted(listed) == sorted(reasons)


def test_reflection_resolves_the_details_as_grpcurl_does(front_door_alone):
    """grpcurl prints a status's details by resolving each Any's type through server reflection;
    `-format-error` prints the google.rpc.Status as JSON. The types come from the front door's
    reflection alone (a pool of nothing else), and format to docs/errors.md's example."""
    with grpc.insecure_channel(front_door_alone.target) as ch:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
        for name in ("ErrorInfo", "BadRequest", "QuotaFailure", "ResourceInfo", "RetryInfo"):
            assert pool.FindMessageTypeByName(f"google.rpc.{name}").file.name == "google/rpc/error_details.proto"
        call = ch.unary_stream("/kimivl.v1.ChatService/Chat", request_serializer=chat_pb2.ChatRequest.SerializeToString,
                               response_deserializer=chat_pb2.ChatResponse.FromString)
        request = json_format.ParseDict({"conversation": {"messages": [{"role": "ROLE_USER", "content": [
            {"text": "hi"}]}]}, "sampling": {"temperature": 9}}, chat_pb2.ChatRequest())
        with pytest.raises(grpc.RpcError) as e:
            list(call(request, timeout=30))
        blob = dict(e.value.trailing_metadata())["grpc-status-details-bin"]
        printed = json_format.MessageToDict(status_pb2.Status.FromString(blob), descriptor_pool=pool)
    (documented,) = [b for b in re.findall(r"```json\n(.*?)```", _doc_section("grpcurl"), re.S) if '"code": 3' in b]
    assert printed == json.loads(documented)


def test_the_hosts_reflection_knows_the_detail_types_before_any_refusal():
    """Reflection serves what is in the process's descriptor pool: hosting a tier puts the
    google.rpc detail types there, not the first refusal's lazy import."""
    code = ("import kimivl_hosting.grpc_host\n"
            "from google.protobuf import descriptor_pool\n"
            "descriptor_pool.Default().FindMessageTypeByName('google.rpc.RetryInfo')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_python_example_prints_what_its_comments_say(front_door_alone):
    (code,) = re.findall(r"```python\n(.*?)```", _doc_section("Python SDK"), re.S)
    expected = re.findall(r"print\(.*\)  # (.*)$", code, re.M)
    proc = subprocess.run([sys.executable, "-c", code.replace("localhost:50051", front_door_alone.target)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == expected and len(expected) == 3
