"""Child server processes for local runs: ``kimivl serve TIER ...`` waited for on grpc.health.v1,
or any server command (``vllm serve`` in the benchmarks).

One launcher for everything that runs servers locally: the tests, ``make run`` and the
benchmarks. Each child runs in a session of its own, so stopping it also ends what it started
(vLLM's engine core and workers), which a killed parent would otherwise leave behind holding
gigabytes; optionally pinned to a set of CPUs, inherited by its children.
"""
from __future__ import annotations

import contextlib
import os
import shlex
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


class ChildProcess:
    """``cmd`` in a session of its own, stdout+stderr appended to ``log`` (None: this process's).

    ``env`` is added to this process's environment (``inherit_env=False``: it is the whole
    environment); ``cpus`` pins the child and everything it starts.
    """

    def __init__(self, name: str, cmd: list[str], *, env: dict | None = None, inherit_env: bool = True,
                 log: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None,
                 cpus: set[int] | None = None, start: bool = True):
        self.name, self.cmd, self.cpus = name, list(cmd), cpus
        self.log_path = Path(log) if log else None
        self.env = dict(os.environ, **(env or {})) if inherit_env else dict(env or {})
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        if start:
            self.start()

    def start(self) -> None:
        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 - the child holds it
        try:
            if out:
                out.write(f"$ {shlex.join(self.cmd)}\n".encode())
                out.flush()
            pin = (lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
                                         env=self.env, cwd=self.cwd, start_new_session=True, preexec_fn=pin)
        finally:
            if out:
                out.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def _tail_note(self) -> str:
        tail = self.tail()
        return f":\n{tail}" if tail else ""

    def terminate(self, sig: int = signal.SIGTERM) -> None:
        """Signal without waiting (servers stopped together drain at once, not one by one)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int | None:
        """Signal, wait up to ``timeout_s``, then SIGKILL whatever is left of its session (the
        engine core, workers); the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        self.terminate(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the group is gone (its memory is freed)
            try:
                os.killpg(self.proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        return self.proc.returncode


class NotServing(RuntimeError):
    pass


class TierProcess(ChildProcess):
    """``kimivl serve <tier> <args>``, listening on ``port`` of loopback (or ``host``)."""

    def __init__(self, tier: str, args: list[str], port: int, *, env: dict | None = None,
                 log: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None,
                 host: str = "127.0.0.1", cpus: set[int] | None = None, start: bool = True):
        self.tier, self.args, self.port = tier, list(args), port
        self.target = f"{host}:{port}"
        super().__init__(tier, [*kimivl_command(), "serve", tier, *self.args], env=env, log=log, cwd=cwd, cpus=cpus,
                         start=start)

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
