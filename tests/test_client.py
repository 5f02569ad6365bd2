"""The Python SDK's transport options against a real front door: TLS, deadlines, typed errors."""
from __future__ import annotations

import io
import subprocess
import time

import pytest
from PIL import Image

from conftest import ServerProcess, free_port, tiny_model_dir
from kimivl.client import Client, DeadlineExceeded, InvalidArgument, Unavailable
from kimivl.thinking import extract_thinking_and_summary


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
    port = free_port()
    srv = ServerProcess("preprocess-tls", ["preprocess", "--model", str(tiny_model_dir()), "--host", "127.0.0.1",
                                           "--port", str(port), "--metrics-port", "0", "--workers", "1",
                                           "--inference-target", f"127.0.0.1:{free_port()}",
                                           "--tls-cert-file", str(cert), "--tls-key-file", str(key)], port)
    try:
        yield srv, cert.read_bytes()
    finally:
        srv.stop()


def test_tls_and_metadata(tls_front_door):
    srv, root = tls_front_door
    deadline = time.monotonic() + 60
    with Client(f"localhost:{srv.port}", root_certificates=root, metadata=[("authorization", "Bearer t0ken")],
                timeout_s=30) as c:
        while True:
            try:
                r = c.preprocess(["Hello", _png(100, 60)])
                break
            except Unavailable:
                if time.monotonic() > deadline or srv.proc.poll() is not None:
                    raise
                time.sleep(0.5)
    assert (r.prompt.images[0].grid_height, r.prompt.images[0].grid_width) == (6, 8)
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
