"""Shared fixtures: the tiny model and the two tiers as real processes on loopback.

Engines start once per test session (vLLM's CPU engine takes ~30-40 s to start).
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kimivl_devtools.launch import NotServing, TierProcess

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY_MODEL = ROOT / "models" / "kimi-vl-tiny"
LOG_DIR = ROOT / ".pytest_cache" / "server-logs"
NODE_DIR = ROOT / "clients" / "node"
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "TOKENIZERS_PARALLELISM": "false",
              "VLLM_NO_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess(TierProcess):
    """A `kimivl serve ...` child process with its log in .pytest_cache/server-logs."""

    def __init__(self, name: str, args: list[str], port: int, env: dict | None = None):
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        tier, *rest = args
        super().__init__(tier, rest, port, env={**ENGINE_ENV, **(env or {})}, log=LOG_DIR / f"{name}-{port}.log",
                         cwd=ROOT)
        self.name = name

    def wait_serving(self, timeout_s: float = 240) -> None:
        try:
            super().wait_serving(timeout_s)
        except NotServing as e:
            raise RuntimeError(str(e)) from None


def start_inference(port: int | None = None, extra: list[str] = (), env: dict | None = None,
                    model: Path | None = None) -> ServerProcess:
    """An inference tier; its Prometheus metrics are at ``srv.metrics``."""
    port, metrics = port or free_port(), free_port()
    srv = ServerProcess("inference", ["inference", "--model", str(model or tiny_model_dir()), "--host", "127.0.0.1",
                                      "--port", str(port), "--metrics-port", str(metrics), "--device", "cpu",
                                      "--enforce-eager", "--max-model-len", "8192", "--limit-mm-per-prompt", "8",
                                      "--max-num-batched-tokens", "8192",
                                      "--drain-timeout-s", "20", "--warmup-grids", "none", *extra], port, env)
    srv.metrics = f"http://127.0.0.1:{metrics}/metrics"
    return srv


def start_preprocess(inference_target: str, extra: list[str] = (), env: dict | None = None,
                     model: Path | None = None) -> ServerProcess:
    """A front door; its OpenAI-compatible HTTP port is ``srv.http`` (http://host:port) and its
    metrics ``srv.metrics``."""
    port, http, metrics = free_port(), free_port(), free_port()
    srv = ServerProcess("preprocess", ["preprocess", "--model", str(model or tiny_model_dir()), "--host", "127.0.0.1",
                                       "--port", str(port), "--metrics-port", str(metrics), "--http-port", str(http),
                                       "--inference-target", inference_target, "--workers", "2",
                                       "--max-images", "8", *extra], port, env)
    srv.http, srv.metrics = f"http://127.0.0.1:{http}", f"http://127.0.0.1:{metrics}/metrics"
    return srv


_made = False


def tiny_model_dir() -> Path:
    """models/kimi-vl-tiny (what `make run` uses), made once if missing; its copy of the
    project's modeling code (remote code) is refreshed, so edits to kimivl_modeling are tested."""
    global _made
    if not _made:
        if not (TINY_MODEL / "config.json").exists():
            from kimivl_devtools.tiny_model import make_tiny_model
            make_tiny_model(str(TINY_MODEL))
        else:
            from kimivl_modeling import install_remote_code
            install_remote_code(TINY_MODEL)
    _made = True
    return TINY_MODEL


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return tiny_model_dir()


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    """The tiny trained demo model, written once per session from the committed weights."""
    from kimivl_devtools.demo_model import make_demo_model

    out = tmp_path_factory.mktemp("demo") / "kimi-vl-demo"
    make_demo_model(str(out))
    return out


@pytest.fixture(scope="session")
def inference_server(tiny_model):
    # Without prefix caching, a request's greedy output doesn't depend on what ran before
    # (a cache hit takes another prefill kernel path, and the random model's logits are
    # nearly tied), so tests can compare outputs across requests and with vLLM's own path.
    srv = start_inference(extra=["--no-prefix-caching"])
    try:
        srv.wait_serving()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def front_door(inference_server):
    srv = start_preprocess(inference_server.target)
    try:
        srv.wait_serving(60)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def front_door_alone(tiny_model):
    """A preprocessing tier whose inference target has nothing listening."""
    srv = start_preprocess(f"127.0.0.1:{free_port()}", extra=["--allow-private-urls"])
    try:
        srv.wait_serving(60)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def node_client() -> str:
    """The node binary, with clients/node's dependencies installed (`npm ci` when one is missing)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are needed for the Node client tests (Node >= 18 on PATH)")
    if not all((NODE_DIR / "node_modules" / dep).is_dir() for dep in ("@grpc/grpc-js", "protobufjs")):
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"npm ci failed in {NODE_DIR}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return node
