"""The Python SDK's transport options against a real front door: TLS, API keys, deadlines, typed errors."""
from __future__ import annotations

import io
import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from conftest import ServerProcess, free_port, tiny_model_dir
from kimivl.client import Client, DeadlineExceeded, InvalidArgument, Unauthenticated, Unavailable
from kimivl.thinking import extract_thinking_and_summary

API_KEY = "sdk-test-key-1"


def _png(w, h) -> bytes:
    buf = io.BytesIO()
    Image.radial_gradient("L").resize((w, h)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tls_front_door(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    keys = d / "api-keys"
    keys.write_text(f"{API_KEY}\n")
    port, http = free_port(), free_port()
    srv = ServerProcess("preprocess-tls", ["preprocess", "--model", str(tiny_model_dir()), "--host", "127.0.0.1",
                                           "--port", str(port), "--metrics-port", "0", "--workers", "1",
                                           "--inference-target", f"127.0.0.1:{free_port()}",
                                           "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                                           "--api-keys-file", str(keys), "--http-port", str(http)], port)
    srv.https = f"https://localhost:{http}"
    try:
        yield srv, cert.read_bytes()
    finally:
        srv.stop()


def test_tls_and_api_key(tls_front_door):
    srv, root = tls_front_door
    deadline = time.monotonic() + 60
    with Client(f"localhost:{srv.port}", root_certificates=root, api_key=API_KEY, timeout_s=30) as c:
        while True:
            try:
                r = c.preprocess(["Hello", _png(100, 60)])
                break
            except Unavailable:
                if time.monotonic() > deadline or srv.proc.poll() is not None:
                    raise
                time.sleep(0.5)
    assert (r.prompt.images[0].grid_height, r.prompt.images[0].grid_width) == (6, 8)
    # The server reads the key: none, a wrong one, or one without "Bearer" is UNAUTHENTICATED.
    for options in ({}, {"api_key": "t0ken"}, {"metadata": [("authorization", API_KEY)]}):
        with Client(f"localhost:{srv.port}", root_certificates=root, timeout_s=30, **options) as c, \
                pytest.raises(Unauthenticated):
            c.preprocess(["Hello"])
    # Raw metadata is sent as given (the key as a bearer token works like api_key=).
    with Client(f"localhost:{srv.port}", root_certificates=root, timeout_s=30,
                metadata=[("authorization", f"Bearer {API_KEY}"), ("x-tenant", "a")]) as c:
        c.preprocess(["Hello"])
    # The HTTP port serves HTTPS with the same certificate, and the same keys.
    ctx = ssl.create_default_context(cadata=root.decode())
    req = urllib.request.Request(srv.https + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
        assert json.loads(resp.read())["data"][0]["id"] == "kimi-vl-tiny"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(srv.https + "/v1/models", context=ctx, timeout=30)
    assert e.value.code == 401
    # Plaintext to a TLS port fails as UNAVAILABLE, not with a hang.
    with Client(f"localhost:{srv.port}", timeout_s=5) as c, pytest.raises(Unavailable):
        c.preprocess(["Hello"])


def test_deadline_and_typed_errors(front_door_alone):
    with Client(front_door_alone.target) as c:
        with pytest.raises(DeadlineExceeded):
            c.preprocess(["big", _png(4000, 3000)], timeout_s=0.005)
        with pytest.raises(InvalidArgument) as e:
            c.chat(["x"], sampling={"temperature": 9})
        assert e.value.details.startswith("sampling.temperature")
        assert e.value.code.name == "INVALID_ARGUMENT"


def test_seed_helper_is_exported():
    assert extract_thinking_and_summary("◁think▷a◁/think▷b") == ("a", "b")
