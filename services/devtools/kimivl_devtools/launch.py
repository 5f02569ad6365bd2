"""Start a tier as a child process (``kimivl serve TIER ...``) and wait for it on grpc.health.v1.

One helper for everything that runs tiers locally: the tests, ``make run`` and the benchmarks.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING


def kimivl_command() -> list[str]:
    """The `kimivl` console script beside this interpreter, else ``python -m kimivl.cli``."""
    exe = Path(sys.executable).with_name("kimivl")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kimivl.cli"]


class NotServing(RuntimeError):
    pass


class TierProcess:
    """``kimivl serve <tier> <args>``, listening on ``port`` of loopback (or ``host``).

    ``log``: a file path for stdout+stderr (appended), or None to share this process's.
    """

    def __init__(self, tier: str, args: list[str], port: int, *, env: dict | None = None,
                 log: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None,
                 host: str = "127.0.0.1", start: bool = True):
        self.name, self.tier, self.args, self.port = tier, tier, list(args), port
        self.target = f"{host}:{port}"
        self.log_path = Path(log) if log else None
        self.env = dict(os.environ, **(env or {}))
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        if start:
            self.start()

    def start(self) -> None:
        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 - the child holds it
        try:
            self.proc = subprocess.Popen([*kimivl_command(), "serve", self.tier, *self.args], stdout=out,
                                         stderr=subprocess.STDOUT if out else None, env=self.env, cwd=self.cwd)
        finally:
            if out:
                out.close()

    def health(self, service: str = "") -> int | None:
        """The health status, or None when nothing answers."""
        with grpc.insecure_channel(self.target) as ch:
            try:
                return health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2).status
            except grpc.RpcError:
                return None

    def wait_serving(self, timeout_s: float = 240, tick: Callable[[], None] | None = None) -> None:
        """Until SERVING; NotServing if the process exits or the time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NotServing(f"the {self.name} tier exited with code {self.proc.returncode}" + self._tail_note())
            if self.health() == SERVING:
                return
            if tick:
                tick()
            time.sleep(0.5)
        raise NotServing(f"the {self.name} tier was not SERVING after {timeout_s:.0f} s" + self._tail_note())

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:]) if self.log_path else ""
        except OSError:
            return ""

    def _tail_note(self) -> str:
        tail = self.tail()
        return f":\n{tail}" if tail else ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int | None:
        """Signal and wait (killing after ``timeout_s``); the exit code."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None
