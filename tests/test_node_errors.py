"""Errors programs can read, through the Node client (clients/node's KimiVLError, printed by
`examples/chat.js --json`), from real front doors on loopback: field paths, limits, the stable
reason and when to retry, each equal to what the Python SDK reads from the same refusal."""
from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import pytest
from grpc_health.v1 import health_pb2

import imagedata
from conftest import NODE_DIR, ROOT, start_preprocess
from fake_inference import FakeInference, thinking_then_answer
from kimivl.client import Client, KimiVLError
from kimivl_contract.errors import DOMAIN, Reason

CHAT_JS = NODE_DIR / "examples" / "chat.js"


def node_error(node: str, target: str, *args: str, api_key: str | None = None) -> dict:
    """The error chat.js --json reports (KimiVLError.toJSON()) for a call that must fail."""
    key = ["--api-key", api_key] if api_key else []
    proc = subprocess.run([node, str(CHAT_JS), "--json", "--target", target, "--timeout-s", "60", *key, *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"error"')]
    return json.loads(line)["error"]


def python_error(target: str, content, api_key: str | None = None, **options) -> KimiVLError:
    with Client(target, timeout_s=60, api_key=api_key) as c, pytest.raises(KimiVLError) as e:
        c.chat(content, **options)
    return e.value


def assert_same_as_python(node: dict, py: KimiVLError) -> None:
    assert node["code"] == py.code.name and node["message"] == py.details
    assert node["reason"] == py.reason and node["errorInfo"]["domain"] == DOMAIN
    assert node["errorInfo"]["metadata"] == py.metadata
    assert [(v["field"], v["description"]) for v in node["fieldViolations"]] == py.field_violations
    assert [(v["subject"], v["description"]) for v in node["quotaViolations"]] == py.quota_violations
    assert node["retryAfterMs"] == (None if py.retry_after_s is None else pytest.approx(py.retry_after_s * 1000))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("node-errors")
    paths = {"photo": d / "coffee.jpg", "garbage": d / "garbage.jpg", "huge": d / "huge.png"}
    paths["photo"].write_bytes(imagedata.photo_jpeg("coffee"))
    paths["garbage"].write_bytes(imagedata.garbage_bytes())
    paths["huge"].write_bytes(imagedata.png_header_only(20000, 20000))
    return {k: str(v) for k, v in paths.items()}


def test_a_field_out_of_range_names_its_path(node_client, front_door_alone):
    e = node_error(node_client, front_door_alone.target, "x", "--temperature", "9")
    assert e["code"] == "INVALID_ARGUMENT" and e["reason"] == Reason.INVALID_ARGUMENT
    assert [v["field"] for v in e["fieldViolations"]] == ["sampling.temperature"]
    assert e["retryAfterMs"] is None and e["quotaViolations"] == [] and e["resourceInfo"] is None
    assert_same_as_python(e, python_error(front_door_alone.target, ["x"], sampling={"temperature": 9}))


def test_a_bad_image_names_the_part_it_came_in(node_client, front_door_alone, files):
    e = node_error(node_client, front_door_alone.target, "look", "--image", files["garbage"])
    assert [v["field"] for v in e["fieldViolations"]] == ["conversation.messages[0].content[1].image"]
    assert_same_as_python(e, python_error(front_door_alone.target, ["look", imagedata.garbage_bytes()]))


def test_too_many_images_is_a_quota_failure_with_the_limit(node_client, front_door_alone, files):
    e = node_error(node_client, front_door_alone.target, "many", *["--image", files["photo"]] * 9)  # the door allows 8
    assert e["code"] == "RESOURCE_EXHAUSTED" and e["reason"] == Reason.LIMIT_EXCEEDED
    assert e["quotaViolations"] and e["errorInfo"]["metadata"]["limit"] == "8"
    assert e["resourceInfo"]["description"] == "limit 8"
    assert_same_as_python(e, python_error(front_door_alone.target, ["many", *[imagedata.photo_jpeg("coffee")] * 9]))


def test_an_image_over_the_pixel_limit_names_the_image_as_the_resource(node_client, front_door_alone, files):
    e = node_error(node_client, front_door_alone.target, "big", "--image", files["huge"])
    path = "conversation.messages[0].content[1].image"
    assert e["code"] == "RESOURCE_EXHAUSTED" and e["reason"] == Reason.LIMIT_EXCEEDED
    assert [v["subject"] for v in e["quotaViolations"]] == [path]
    assert e["resourceInfo"]["resourceType"] == "image" and e["resourceInfo"]["resourceName"] == path
    assert_same_as_python(e, python_error(front_door_alone.target, ["big", imagedata.png_header_only(20000, 20000)]))


def test_no_inference_tier_says_when_to_retry(node_client, front_door_alone):
    e = node_error(node_client, front_door_alone.target, "anyone?", "--max-tokens", "2")
    assert e["code"] == "UNAVAILABLE" and e["reason"] == Reason.UNAVAILABLE and e["retryAfterMs"] == 1000
    assert_same_as_python(e, python_error(front_door_alone.target, ["anyone?"], sampling={"max_tokens": 2}))


def test_the_unary_preprocess_call_reads_the_details_too(node_client, front_door_alone):
    script = ("const { KimiVLClient } = require(process.argv[1]);"
              "const c = new KimiVLClient(process.argv[2]);"
              "c.preprocess(['look', Buffer.from('not an image')]).then(() => process.exit(1),"
              " (e) => { console.log(JSON.stringify(e)); c.close(); });")
    proc = subprocess.run([node_client, "-e", script, str(NODE_DIR), front_door_alone.target], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    e = json.loads(proc.stdout)
    assert e["reason"] == Reason.INVALID_ARGUMENT
    assert [v["field"] for v in e["fieldViolations"]] == ["conversation.messages[0].content[1].image"]


def test_a_refused_key_and_a_draining_front_door_carry_their_reasons(node_client, tmp_path):
    """One front door with API keys before a scripted inference tier whose replies last a few
    seconds: a wrong key is UNAUTHENTICATED; then, while a chat is in flight, SIGTERM drains the
    door and a new chat is refused UNAVAILABLE with a RetryInfo."""
    key = "node-errors-key"
    (tmp_path / "keys").write_text(f"{key}\n")
    with FakeInference(thinking_then_answer(["t"] * 4, ["a"] * 60), delay_s=0.1) as fake:
        door = start_preprocess(fake.target, extra=["--api-keys-file", str(tmp_path / "keys"),
                                                    "--drain-timeout-s", "30"])
        try:
            door.wait_serving(120)
            e = node_error(node_client, door.target, "hi", api_key="wrong")
            assert e["code"] == "UNAUTHENTICATED" and e["reason"] == Reason.UNAUTHENTICATED
            assert e["fieldViolations"] == [] and e["retryAfterMs"] is None
            assert_same_as_python(e, python_error(door.target, ["hi"], api_key="wrong"))

            events, first = [], threading.Event()

            def in_flight():
                with Client(door.target, timeout_s=60, api_key=key) as c:
                    for ev in c.stream(["a long one"]):
                        events.append(ev)
                        first.set()

            streaming = threading.Thread(target=in_flight)
            streaming.start()
            assert first.wait(60), "the chat in flight never started"
            door.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 20
            while door.health() != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "the front door never reported draining"
                time.sleep(0.05)
            e = node_error(node_client, door.target, "one more", api_key=key)
            assert e["code"] == "UNAVAILABLE" and e["reason"] == Reason.UNAVAILABLE and "draining" in e["message"]
            assert e["retryAfterMs"] == 100
            assert_same_as_python(e, python_error(door.target, ["one more"], api_key=key))
            streaming.join(60)
            assert events and events[-1].result is not None, "the chat in flight was cut by the drain"
            assert door.proc.wait(60) == 0
        finally:
            door.stop()
