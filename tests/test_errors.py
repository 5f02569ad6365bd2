"""Errors programs can read: google.rpc details on every rejection, through the Python SDK, from a
real front door on loopback (its inference target has nothing listening)."""
from __future__ import annotations

import grpc
import pytest

import imagedata
from kimivl.client import Client, InvalidArgument, KimiVLError, ResourceExhausted, Unavailable
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
