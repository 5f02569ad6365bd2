"""Server processes: ports, environment, process groups, health waits, server logs."""
from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

from kimivl_devtools.launch import ChildProcess

from . import log

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # bench/
ROOT = os.path.dirname(BENCH)
SHIM_ENV = "KIMIVL_BENCH_VLLM_SHIM"
SOURCE_DIRS = [os.path.join(ROOT, "clients", "python"),
               *(os.path.join(ROOT, "services", d) for d in ("common", "inference", "preprocess", "devtools"))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def project_paths() -> list[str]:
    """Where the project must come from: an installed kimivl (wheel or editable, with its
    generated kimivl.v1 stubs) if there is one, else this working tree's source folders (which
    then need the stubs generated: scripts/gen_protos.py)."""
    try:
        ok = all(importlib.util.find_spec(m) is not None
                 for m in ("kimivl.v1.chat_pb2", "kimivl_inference", "kimivl_preprocess"))
    except ModuleNotFoundError:
        ok = False
    return [BENCH] if ok else [*SOURCE_DIRS, BENCH]


def vllm_plugins_env(mode: str, cpu: bool) -> dict:
    """vllm serve as its users run it: without this project's ``vllm.general_plugins`` entry
    (kimivl_inference.hf_processor, which would replace the checkpoint's own remote-code HF
    processor). The tiny CPU model has no processor code of its own and needs it."""
    if mode == "all" or (mode == "auto" and cpu):
        return {}
    eps = importlib.metadata.entry_points()
    if not any(ep.name == "kimivl" and ep.group == "vllm.general_plugins" for ep in eps):
        return {}
    keep = sorted({ep.name for ep in eps if ep.group.startswith("vllm.") and ep.name != "kimivl"})
    return {"VLLM_PLUGINS": ",".join(keep)}  # "" (no name matches it) loads none


def child_env(cpu: bool, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(project_paths() + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                           if p])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if importlib.util.find_spec("flashinfer") is None:
        env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # else vLLM's sampler imports it and dies
    if cpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.update(extra or {})
    return env


_LIVE: set = set()  # every Proc not yet stopped, for kill_all()


def kill_all() -> None:
    """SIGKILL the process group of every server still running: the benchmark's last act,
    whatever ended it (servers run in sessions of their own and would outlive it)."""
    for proc in list(_LIVE):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        _LIVE.discard(proc)


class Proc(ChildProcess):
    """A benchmark's server process (kimivl_devtools.launch.ChildProcess: a session of its own,
    optionally on a set of CPUs), its log in ``log_dir``, remembered for :func:`kill_all`."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_dir: str, cpus: set[int] | None = None):
        super().__init__(name, cmd, env=env, inherit_env=False, cwd=ROOT, cpus=cpus,
                         log=os.path.join(log_dir, f"{name.replace(':', '_')}.log"))
        self.p = self.proc
        _LIVE.add(self)

    def stop(self, grace_s: float = 60.0) -> None:
        if self.alive():
            self.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: no exit {grace_s:.0f} s after SIGTERM; SIGKILL to its group")
        super().stop(timeout_s=0)
        _LIVE.discard(self)


async def wait_grpc(port: int, proc: Proc, timeout_s: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with {proc.p.returncode}; see {proc.log_path}")
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{proc.name} not SERVING after {timeout_s:.0f} s")


async def http_json(method: str, url: str, body=None, timeout_s: float = 600.0):
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
        async with s.request(method, url, json=body) as r:
            text = await r.text()
            if r.status != 200:
                raise RuntimeError(f"{method} {url}: HTTP {r.status}: {text[:300]}")
            return json.loads(text) if text.strip() else None


async def wait_http(url: str, proc: Proc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.p.returncode}; see {proc.log_path}")
        try:
            await http_json("GET", url, timeout_s=3)
            return
        except Exception:  # noqa: BLE001 - not up yet
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout_s:.0f} s")


def vllm_cli() -> list[str]:
    """How to run vLLM's CLI here: ``python -m vllm.entrypoints.cli.main`` where the ``vllm``
    distribution is installed, else through serving.py's shim (vllm-cpu)."""
    try:
        importlib.metadata.version("vllm")
        return [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, os.path.join(BENCH, "serving.py"), "--vllm-cli"]


_KV = re.compile(r"KV cache size: ([\d,]+) tokens")


def kv_cache_tokens(log_text: str) -> int | None:
    """The KV cache size vLLM logged at start ("GPU KV cache size: 1,234 tokens")."""
    m = _KV.findall(log_text)
    return int(m[-1].replace(",", "")) if m else None


def matching_lines(log_text: str, pattern: str, limit: int = 4, first: str = "kimivl.inference") -> list[str]:
    """Log lines matching ``pattern`` (not the "$ command" line), those naming ``first`` first."""
    rx = re.compile(pattern, re.IGNORECASE)
    got = [line.strip()[:300] for line in log_text.splitlines() if rx.search(line) and not line.startswith("$ ")]
    return sorted(got, key=lambda line: first not in line)[:limit]


def collect_logs(out: str, keep_head: int = 150, keep_tail: int = 250) -> None:
    """Every server's log, head and tail, in one servers.log (a device call returns <= 8 files)."""
    d = os.path.join(out, ".logs")
    if not os.path.isdir(d):
        return
    with open(os.path.join(out, "servers.log"), "a") as dst:
        for name in sorted(os.listdir(d)):
            lines = open(os.path.join(d, name), errors="replace").read().splitlines()
            dst.write(f"===== {name} ({len(lines)} lines) =====\n")
            if len(lines) > keep_head + keep_tail:
                # vLLM's periodic stats lines (running/waiting, throughput) are kept from the middle too
                middle = lines[keep_head:-keep_tail]
                stats = [x for x in middle if "Avg prompt throughput" in x]
                lines = lines[:keep_head] + [f"... {len(middle) - len(stats)} lines left out; vLLM's stats lines "
                                             "kept ..."] + stats + ["..."] + lines[-keep_tail:]
            dst.write("\n".join(lines) + "\n")
            os.remove(os.path.join(d, name))
    with contextlib.suppress(OSError):
        os.rmdir(d)
