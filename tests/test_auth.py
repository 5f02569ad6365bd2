"""API keys at the front door (``--api-keys-file``): the key file (format, re-read on change,
rotation as a Kubernetes Secret does it), and a real front door on loopback refusing RPCs of
ChatService/PreprocessService and /v1 HTTP requests without a key, with health and reflection
open; the Python SDK (``api_key=``) and ``kimivl chat`` (``--api-key``, ``$KIMIVL_API_KEY``) send
it. No engine: PreprocessService answers without one, and a chat that passed authentication
gets UNAVAILABLE (no inference tier) where one that did not gets UNAUTHENTICATED."""
from __future__ import annotations

import io
import json
import os
import subprocess
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from conftest import BIN, ServerProcess, free_port, tiny_model_dir
from kimivl.client import Client, Unauthenticated, Unavailable
from kimivl_contract.errors import Unauthenticated as UnauthenticatedError
from kimivl_preprocess.auth import ApiKeys, bearer_token, parse_keys

KEYS = ["key-alpha-0123456789", "key-beta-9876543210"]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.radial_gradient("L").resize((100, 60)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- the key file
def test_file_format_and_bearer_parsing():
    assert len(parse_keys("# keys\n\n  a  \nb\n#c\n")) == 2
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer") is None and bearer_token(None) is None


def test_check_reload_and_kubernetes_style_rotation(tmp_path):
    # A Secret volume: the file is a symlink through ..data to a timestamped directory, and
    # kubelet updates it by swapping ..data.
    v1, v2 = tmp_path / "..2026_1", tmp_path / "..2026_2"
    v1.mkdir()
    v2.mkdir()
    (v1 / "keys").write_text("old-key\n")
    (v2 / "keys").write_text("# rotated\nnew-key\n")
    (tmp_path / "..data").symlink_to(v1.name)
    (tmp_path / "keys").symlink_to("..data/keys")
    keys = ApiKeys(str(tmp_path / "keys"), recheck_s=0)
    keys.check("Bearer old-key")
    for bad, message in ((None, "missing API key"), ("Bearer nope", "invalid API key"), ("old-key", "missing")):
        with pytest.raises(UnauthenticatedError, match=message):
            keys.check(bad)
    tmp = tmp_path / "..data_tmp"
    tmp.symlink_to(v2.name)
    os.replace(tmp, tmp_path / "..data")
    keys.check("Bearer new-key")
    with pytest.raises(UnauthenticatedError):
        keys.check("Bearer old-key")
    # Briefly missing (mid-rotation): the keys loaded before still hold.
    os.remove(tmp_path / "..data")
    keys.check("Bearer new-key")
    # Emptied on purpose: everything is refused.
    (tmp_path / "..data").symlink_to(v1.name)
    (v1 / "keys").write_text("# no keys\n")
    with pytest.raises(UnauthenticatedError):
        keys.check("Bearer new-key")


def test_unreadable_or_empty_file_at_start_is_fatal(tmp_path):
    with pytest.raises(SystemExit, match="cannot read"):
        ApiKeys(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(SystemExit, match="holds no keys"):
        ApiKeys(str(tmp_path / "empty"))


# --------------------------------------------------------------------------- a real front door
@pytest.fixture(scope="module")
def keyed_door(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys"
    path.write_text("# two keys\n" + "\n".join(KEYS) + "\n")
    port, http = free_port(), free_port()
    srv = ServerProcess("preprocess-keys", ["preprocess", "--model", str(tiny_model_dir()), "--host", "127.0.0.1",
                                            "--port", str(port), "--http-port", str(http), "--metrics-port", "0",
                                            "--workers", "1", "--inference-target", f"127.0.0.1:{free_port()}",
                                            "--api-keys-file", str(path)], port)
    try:
        srv.wait_serving(120)
        srv.http = f"http://127.0.0.1:{http}"
        srv.keys_path = path
        yield srv
    finally:
        srv.stop()


def _http(url: str, key: str | None = None, body: dict | None = None) -> tuple[int, dict | None]:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
            return r.status, json.loads(data) if data else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_grpc_rpcs_need_a_key_health_and_reflection_do_not(keyed_door):
    with Client(keyed_door.target, api_key=KEYS[1], timeout_s=30) as c:
        r = c.preprocess(["Hello", _png()])
    assert (r.prompt.images[0].grid_height, r.prompt.images[0].grid_width) == (6, 8)
    for options, message in (({}, "missing API key"), ({"api_key": "wrong"}, "invalid API key"),
                             ({"metadata": [("authorization", KEYS[0])]}, "missing API key")):  # no "Bearer"
        with Client(keyed_door.target, timeout_s=30, **options) as c:
            with pytest.raises(Unauthenticated) as e:
                c.preprocess(["Hello"])
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and e.value.details.startswith(message)
            with pytest.raises(Unauthenticated):
                c.chat(["Hello"])
    with grpc.insecure_channel(keyed_door.target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="kimivl.v1.ChatService"),
                                                      timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        listed = next(iter(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)))
        assert "kimivl.v1.ChatService" in {s.name for s in listed.list_services_response.service}


def test_a_chat_with_a_key_gets_past_authentication(keyed_door):
    with Client(keyed_door.target, api_key=KEYS[0], timeout_s=30) as c, pytest.raises(Unavailable):
        c.chat(["Hello"])


def test_http_needs_a_key_on_v1_only(keyed_door):
    assert _http(keyed_door.http + "/health")[0] == 200
    assert _http(keyed_door.http + "/ready") == (200, {"status": "SERVING"})
    status, body = _http(keyed_door.http + "/v1/models")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert body["error"]["message"].startswith("missing API key")
    status, body = _http(keyed_door.http + "/v1/chat/completions", "wrong", {"messages": []})
    assert status == 401 and body["error"]["message"] == "invalid API key"
    status, body = _http(keyed_door.http + "/v1/models", KEYS[0])
    assert status == 200 and body["data"][0]["id"] == "kimi-vl-tiny"
    status, body = _http(keyed_door.http + "/v1/chat/completions", KEYS[1],
                         {"model": "kimi-vl-tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 503 and "inference tier unavailable" in body["error"]["message"]


def test_rotation_without_restart_and_keys_never_logged(keyed_door):
    original = keyed_door.keys_path.read_text()
    try:
        keyed_door.keys_path.write_text("rotated-key-42\n")
        deadline = time.monotonic() + 10
        while _http(keyed_door.http + "/v1/models", "rotated-key-42")[0] != 200:
            assert time.monotonic() < deadline, "the new key was not picked up"
            time.sleep(0.3)
        assert _http(keyed_door.http + "/v1/models", KEYS[0])[0] == 401
        with Client(keyed_door.target, api_key="rotated-key-42", timeout_s=30) as c:
            c.preprocess(["Hello"])
    finally:
        keyed_door.keys_path.write_text(original)
    deadline = time.monotonic() + 10
    while _http(keyed_door.http + "/v1/models", KEYS[0])[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    log = keyed_door.log_path.read_text()
    assert "API key authentication is on: 2 keys" in log and "changed: 1 keys" in log
    for key in [*KEYS, "rotated-key-42"]:
        assert key not in log


def test_kimivl_chat_sends_the_key_from_the_flag_or_the_environment(keyed_door):
    def chat(*args, env=None):
        return subprocess.run([str(BIN / "kimivl"), "chat", "--target", keyed_door.target, "--timeout-s", "30",
                               *args, "Hello"], capture_output=True, text=True, timeout=120,
                              env={**os.environ, **(env or {})})

    env_without = {k: v for k, v in os.environ.items() if k != "KIMIVL_API_KEY"}
    proc = subprocess.run([str(BIN / "kimivl"), "chat", "--target", keyed_door.target, "--timeout-s", "30", "Hello"],
                          capture_output=True, text=True, timeout=120, env=env_without)
    assert proc.returncode == 3 and "UNAUTHENTICATED" in proc.stderr, proc.stderr
    proc = chat("--api-key", KEYS[0])
    assert proc.returncode == 3 and "UNAVAILABLE" in proc.stderr, proc.stderr
    proc = chat(env={"KIMIVL_API_KEY": KEYS[1]})
    assert proc.returncode == 3 and "UNAVAILABLE" in proc.stderr, proc.stderr


def test_off_without_a_keys_file_and_says_so(front_door_alone):
    with Client(front_door_alone.target, timeout_s=30) as c:
        c.preprocess(["Hello"])
    assert "API key authentication is OFF" in front_door_alone.log_path.read_text()
