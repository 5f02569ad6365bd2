"""Shared fixtures: the tiny model and the two tiers as real processes on loopback.

Engines start once per test session (vLLM's CPU engine takes ~30-40 s to start).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY_MODEL = ROOT / "models" / "kimi-vl-tiny"
LOG_DIR = ROOT / ".pytest_cache" / "server-logs"
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "TOKENIZERS_PARALLELISM": "false",
              "VLLM_NO_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `kimivl serve ...` child process with its log in .pytest_cache/server-logs."""

    def __init__(self, name: str, args: list[str], port: int, env: dict | None = None):
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.name, self.args, self.port = name, args, port
        self.target = f"127.0.0.1:{port}"
        self.log_path = LOG_DIR / f"{name}-{port}.log"
        self.env = dict(os.environ, **ENGINE_ENV, **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(BIN / "kimivl"), "serve", *self.args], stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=ROOT)

    def health(self, service: str = "") -> int | None:
        with grpc.insecure_channel(self.target) as ch:
            try:
                return health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2).status
            except grpc.RpcError:
                return None

    def wait_serving(self, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            if self.health() == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not SERVING after {timeout_s} s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, sig=signal.SIGTERM, timeout_s: float = 60) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_inference(port: int | None = None, extra: list[str] = (), model: Path | None = None) -> ServerProcess:
    port = port or free_port()
    return ServerProcess("inference", ["inference", "--model", str(model or tiny_model_dir()), "--host", "127.0.0.1",
                                       "--port", str(port), "--metrics-port", str(free_port()), "--device", "cpu",
                                       "--enforce-eager", "--max-model-len", "8192", "--limit-mm-per-prompt", "8",
                                       "--max-num-batched-tokens", "8192",
                                       "--drain-timeout-s", "20", *extra], port)


def start_preprocess(inference_target: str, extra: list[str] = (), model: Path | None = None) -> ServerProcess:
    port = free_port()
    return ServerProcess("preprocess", ["preprocess", "--model", str(model or tiny_model_dir()), "--host", "127.0.0.1",
                                        "--port", str(port), "--metrics-port", str(free_port()),
                                        "--inference-target", inference_target, "--workers", "2",
                                        "--max-images", "8", *extra], port)


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
    """The tiny trained demo model, written afresh from the committed weights (~20 s)."""
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
