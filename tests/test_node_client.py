"""The Node client (clients/node, @kimivl/client) against the real servers: its example
`examples/chat.js --json` streams a chat with an image, and its greedy tokens equal the
Python SDK's for the same request; gRPC errors exit 3 with the status on stderr; and the
package's own unit tests pass."""
from __future__ import annotations

import io
import json
import os
import subprocess

import pytest
from PIL import Image
from skimage import data as skdata

from conftest import NODE_DIR, ROOT, ServerProcess, free_port, tiny_model_dir
from kimivl.client import Client

CHAT_JS = NODE_DIR / "examples" / "chat.js"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def astronaut_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def astronaut_path(tmp_path_factory, astronaut_jpeg):
    path = tmp_path_factory.mktemp("node") / "astronaut.jpg"
    path.write_bytes(astronaut_jpeg)
    return path


def run_chat(node: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([node, str(CHAT_JS), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.engine
def test_streamed_chat_equals_the_python_sdk(node_client, front_door, astronaut_path, astronaut_jpeg):
    # Text first, then the image: the same order as the Python request below.
    proc = run_chat(node_client, "--json", "--target", front_door.target, "Describe", "--image", str(astronaut_path),
                    "--max-tokens", str(MAX_TOKENS), "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert events and "result" in events[-1], proc.stdout
    deltas, result = events[:-1], events[-1]["result"]
    assert deltas and all("result" not in d for d in deltas)
    ids = [t for d in deltas for t in d["token_ids"]]
    assert len(ids) == MAX_TOKENS
    assert result["finish_reason"] == "FINISH_REASON_LENGTH"
    u = result["usage"]
    assert u["prompt_tokens"] > u["image_tokens"] > 0
    assert u["thinking_tokens"] + u["answer_tokens"] == MAX_TOKENS
    assert result["timings"]["preprocess_ms"] > 0

    with Client(front_door.target, timeout_s=300) as c:
        py = c.chat(["Describe", astronaut_jpeg], sampling={"temperature": 0.0, "max_tokens": MAX_TOKENS})
    assert ids == py.token_ids
    assert "".join(d["thinking"] for d in deltas) == py.thinking
    assert "".join(d["answer"] for d in deltas) == py.answer
    assert u["image_tokens"] == py.usage.image_tokens and u["prompt_tokens"] == py.usage.prompt_tokens


def test_no_inference_tier_exits_3_with_unavailable(node_client, front_door_alone):
    proc = run_chat(node_client, "--target", front_door_alone.target, "hello", "--max-tokens", "4", timeout=120)
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: UNAVAILABLE: "), proc.stderr


def test_out_of_range_sampling_exits_3_with_invalid_argument(node_client, front_door_alone):
    # Sampling is validated before the inference tier is contacted, so no engine is needed.
    proc = run_chat(node_client, "--target", front_door_alone.target, "hello", "--temperature", "5", timeout=120)
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: INVALID_ARGUMENT: "), proc.stderr
    assert "sampling.temperature" in proc.stderr


def test_bad_arguments_exit_2(node_client):
    proc = run_chat(node_client, "--max-tokens", "lots", "hello", timeout=60)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)


def test_api_key_from_the_option_or_the_environment(node_client, tmp_path):
    """A front door with --api-keys-file: without a key the call is UNAUTHENTICATED; with it
    (--api-key, or $KIMIVL_API_KEY) it gets past authentication to the absent inference tier."""
    keys = tmp_path / "keys"
    keys.write_text("node-key-1\n")
    port = free_port()
    srv = ServerProcess("preprocess-node-keys", ["preprocess", "--model", str(tiny_model_dir()), "--host", "127.0.0.1",
                                                 "--port", str(port), "--metrics-port", "0", "--workers", "1",
                                                 "--inference-target", f"127.0.0.1:{free_port()}",
                                                 "--api-keys-file", str(keys)], port)
    try:
        srv.wait_serving(120)
        env = {k: v for k, v in os.environ.items() if k != "KIMIVL_API_KEY"}
        cases = [((), env, "UNAUTHENTICATED"), (("--api-key", "nope"), env, "UNAUTHENTICATED"),
                 (("--api-key", "node-key-1"), env, "UNAVAILABLE"), ((), {**env, "KIMIVL_API_KEY": "node-key-1"},
                                                                     "UNAVAILABLE")]
        for args, case_env, code in cases:
            proc = subprocess.run([node_client, str(CHAT_JS), "--target", srv.target, "--timeout-s", "30", *args,
                                   "Hello"], capture_output=True, text=True, timeout=120, cwd=ROOT, env=case_env)
            assert proc.returncode == 3 and f"error: {code}" in proc.stderr, (args, proc.stderr)
    finally:
        srv.stop()


def test_the_node_unit_tests_pass(node_client):
    """clients/node's own tests (`npm test`: requests, the CLI, and the client against an
    in-process fake ChatService, error details included), so `make test` runs them too."""
    tests = sorted(str(p) for p in (NODE_DIR / "test").glob("*.test.js"))
    assert tests
    proc = subprocess.run([node_client, "--test", *tests], cwd=NODE_DIR, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout
