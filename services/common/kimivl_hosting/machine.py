"""What this process may use of the machine: CPUs and memory, container limits included.

Admission budgets default to figures derived from these, so a tier sized by Kubernetes
(``resources.limits``) sheds load before it is throttled or killed for memory.
"""
from __future__ import annotations

import os

_UNLIMITED = 1 << 60


def cpu_count() -> int:
    """CPUs this process may run on: the affinity mask, lowered by a cgroup CPU quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    return max(1, min(n, int(quota + 0.5))) if quota else max(1, n)


def memory_bytes() -> int:
    """Memory this process may use: the cgroup limit (v2 or v1) where one is set, else physical RAM."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        value = _read(path)
        if value and value != "max":
            try:
                limit = int(value)
            except ValueError:
                continue
            if 0 < limit < _UNLIMITED:
                return min(limit, physical)
    return physical


def _cgroup_cpu_quota() -> float | None:
    v2 = _read("/sys/fs/cgroup/cpu.max")
    if v2:
        quota, _, period = v2.partition(" ")
        if quota != "max":
            try:
                return int(quota) / int(period or 100000)
            except ValueError:
                return None
        return None
    quota, period = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    try:
        q, p = int(quota or -1), int(period or 100000)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None
