"""`kimivl chat` against real servers: live view, --json events, exit codes, part order."""
from __future__ import annotations

import json
import re
import subprocess

import pytest
from PIL import Image
from skimage import data as skdata

from conftest import BIN, ROOT
from kimivl.chat_cli import _content, _parser, _split_parts
from kimivl.client import build_request


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("astronaut", "coffee"):
        p = d / f"{name}.jpg"
        Image.fromarray(getattr(skdata, name)()).save(p, quality=90)
        paths.append(str(p))
    return paths


def kimivl_chat(*args, timeout=600):
    return subprocess.run([str(BIN / "kimivl"), "chat", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_images_keep_their_place_among_text_arguments(photos):
    parts, rest = _split_parts(_parser(), ["--image", photos[0], "first", "--target", "h:1", "--image", photos[1],
                                           "second", "--no-thinking"])
    assert rest == ["--target", "h:1", "--no-thinking"]
    req = build_request(_content(parts))
    kinds = [p.WhichOneof("part") for p in req.conversation.messages[0].content]
    assert kinds == ["image", "text", "image", "text"]
    assert req.conversation.messages[0].content[1].text == "first"
    assert req.conversation.messages[0].content[0].image.data == open(photos[0], "rb").read()


@pytest.mark.engine
def test_json_events_then_result(front_door, photos):
    p = kimivl_chat("--json", "--target", front_door.target, "--image", photos[0], "What is this?", "--image",
                    photos[1], "--max-tokens", "10", "--temperature", "0")
    assert p.returncode == 0, p.stderr
    lines = [json.loads(x) for x in p.stdout.splitlines()]
    deltas, result = lines[:-1], lines[-1]["result"]
    assert sum(len(d["token_ids"]) for d in deltas) == 10
    assert {"thinking", "answer", "token_ids"} <= set(deltas[0])
    assert result["finish_reason"] == "FINISH_REASON_LENGTH"
    assert result["usage"]["image_tokens"] == 38 * 38 // 4 + 30 * 44 // 4


@pytest.mark.engine
def test_live_view_prints_answer_and_usage(front_door, photos):
    p = kimivl_chat("--target", front_door.target, "--image", photos[1], "Describe", "--max-tokens", "8",
                    "--no-thinking")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "thinking…" not in p.stdout  # hidden with --no-thinking
    header = lines.index("answer")  # the answer section, then its streamed text, then usage
    assert lines[header + 1].strip(), "no answer text streamed"
    assert re.search(r"^── length · prompt \d+ tok .* · thinking \d+ · answer \d+ · .*first token \d+ ms",
                     lines[-1]), lines[-1]


def test_grpc_error_exit_code(front_door_alone):
    p = kimivl_chat("--target", front_door_alone.target, "hello", timeout=120)
    assert p.returncode == 3
    assert "UNAVAILABLE" in p.stderr


def test_bad_arguments_exit_code(front_door_alone):
    assert kimivl_chat("--target", front_door_alone.target).returncode == 2  # nothing to say
    missing = kimivl_chat("--target", front_door_alone.target, "--image", "/no/such.jpg", "hi")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    assert kimivl_chat("--max-tokens", "lots", "hi").returncode == 2
    bad = kimivl_chat("--json", "--target", front_door_alone.target, "--temperature", "7", "hi", timeout=120)
    assert bad.returncode == 3
    assert json.loads(bad.stdout.splitlines()[-1])["error"]["code"] == "INVALID_ARGUMENT"
