"""kimivl_devtools.launch: a child server's whole session ends with it (vLLM's engine core
and workers are grandchildren that a plain kill of the child leaves running)."""
from __future__ import annotations

import os
import sys
import time

import psutil

from kimivl_devtools.launch import ChildProcess

# A child that starts a grandchild, reports its pid and its own CPU affinity, then waits.
SPAWNER = """
import os, subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
print("SPAWNED", g.pid, ",".join(map(str, sorted(os.sched_getaffinity(0)))), flush=True)
time.sleep(300)
"""


def _first_line(child: ChildProcess, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = [ln for ln in child.log_text().splitlines() if ln.startswith("SPAWNED ")]
        if lines:
            return lines[0].removeprefix("SPAWNED ")
        time.sleep(0.05)
    raise AssertionError("the child printed nothing")


def test_stop_ends_the_childs_whole_session_even_a_grandchild_ignoring_sigterm(tmp_path):
    child = ChildProcess("spawner", [sys.executable, "-c", SPAWNER], log=tmp_path / "spawner.log")
    grandchild = int(_first_line(child).split()[0])
    assert psutil.pid_exists(grandchild)
    assert os.getsid(child.pid) == child.pid  # a session of its own: our signals do not reach it by accident
    child.stop(timeout_s=5)
    assert not child.alive()
    deadline = time.monotonic() + 10
    while psutil.pid_exists(grandchild) and psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the grandchild outlived stop()"
        time.sleep(0.05)
    assert child.log_text().startswith(f"$ {sys.executable} -c")  # the log says what ran


def test_cpus_pin_the_child_and_what_it_starts(tmp_path):
    cpu = min(os.sched_getaffinity(0))
    child = ChildProcess("pinned", [sys.executable, "-c", SPAWNER], log=tmp_path / "pinned.log", cpus={cpu})
    try:
        grandchild, affinity = _first_line(child).split()
        assert affinity == str(cpu)
        assert psutil.Process(int(grandchild)).cpu_affinity() == [cpu]
    finally:
        child.stop(timeout_s=5)
