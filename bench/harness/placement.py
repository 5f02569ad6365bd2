"""CPU placement, as the manifests place the tiers: the front door on cores of its own, the
inference tier and its engine on the rest, and the load generator where it disturbs neither.

Roles and what runs in them:

    front door   ``kimivl serve preprocess`` (every ours:N's)
    engine       the inference tier with its engine core; the ceiling's engine core (a child of
                 this process); every process of ``vllm serve`` unless ``--vllm-cpus``
    load gen     this process: the load generator, and the ceiling's AsyncLLM front end (output
                 handling), which is part of that system by definition

A process started on a CPU set passes it to what it starts (sched_setaffinity is inherited);
after each start every thread of the system's process trees is set again (a library may set its
own), and the sets actually in force are read back and recorded.
"""
from __future__ import annotations

import contextlib
import os


def parse_cpus(text: str | None) -> set[int] | None:
    """"0-3,8,10-11" -> {0, 1, 2, 3, 8, 10, 11}; None or "" -> None (not placed)."""
    if not text:
        return None
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        a, b = int(lo), int(hi) if dash else int(lo)
        if b < a:
            raise SystemExit(f"CPU list {text!r}: {part} runs backwards")
        out.update(range(a, b + 1))
    return out or None


def format_cpus(cpus) -> str:
    """{0, 1, 2, 3, 8} -> "0-3,8"."""
    if not cpus:
        return "-"
    c = sorted(cpus)
    runs, start, prev = [], c[0], c[0]
    for x in c[1:]:
        if x != prev + 1:
            runs.append((start, prev))
            start = x
        prev = x
    runs.append((start, prev))
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


class Placement:
    def __init__(self, front_door=None, engine=None, loadgen=None, vllm=None):
        self.front_door = parse_cpus(front_door)
        self.engine = parse_cpus(engine)
        self.loadgen = parse_cpus(loadgen)
        self.vllm = parse_cpus(vllm) or self.engine
        avail = os.sched_getaffinity(0)
        for name, cpus in (("--front-door-cpus", self.front_door), ("--engine-cpus", self.engine),
                           ("--loadgen-cpus", self.loadgen), ("--vllm-cpus", self.vllm)):
            if cpus and not cpus <= avail:
                raise SystemExit(f"{name} {format_cpus(cpus)}: CPUs {format_cpus(cpus - avail)} are not available "
                                 f"to this process (it may use {format_cpus(avail)})")
        self.available = avail

    @property
    def placed(self) -> bool:
        return any((self.front_door, self.engine, self.loadgen))

    def as_dict(self) -> dict:
        return {"front_door": format_cpus(self.front_door), "engine": format_cpus(self.engine),
                "loadgen": format_cpus(self.loadgen), "vllm": format_cpus(self.vllm),
                "available": format_cpus(self.available)}

    def describe(self, kind: str) -> str:
        """One line that goes with every figure of a system of this kind."""
        if not self.placed:
            return f"unplaced: every process on CPUs {format_cpus(self.available)}"
        lg = f"load gen {format_cpus(self.loadgen or self.available)}"
        if kind == "ours":
            return (f"front door {format_cpus(self.front_door or self.available)} · inference tier + engine "
                    f"{format_cpus(self.engine or self.available)} · {lg}")
        if kind == "vllm":
            return f"vllm serve (API servers + engine) {format_cpus(self.vllm or self.available)} · {lg}"
        return f"engine core {format_cpus(self.engine or self.available)} · {lg} (+ AsyncLLM front end)"

    def apply_to_self(self) -> None:
        """This process's threads (so far, and those they start) on the load generator's CPUs."""
        if self.placed:
            set_threads(os.getpid(), self.loadgen or self.available)


def set_threads(pid: int, cpus: set[int]) -> int:
    """Every thread of one process on ``cpus``; returns how many were set."""
    n = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)
                n += 1
    return n


def set_tree(pid: int, cpus: set[int] | None) -> None:
    """A process and all its descendants, every thread, on ``cpus``."""
    if not cpus:
        return
    import psutil

    with contextlib.suppress(psutil.Error):
        p = psutil.Process(pid)
        for q in [p, *p.children(recursive=True)]:
            set_threads(q.pid, cpus)


def read_tree(pid: int, children: bool = True) -> dict[str, str]:
    """{process label: its threads' CPU sets} for a process (and its descendants), as in force."""
    import psutil

    out: dict[str, str] = {}
    with contextlib.suppress(psutil.Error):
        p = psutil.Process(pid)
        for q in [p, *(p.children(recursive=True) if children else [])]:
            with contextlib.suppress(psutil.Error, OSError):
                sets = set()
                for tid in os.listdir(f"/proc/{q.pid}/task"):
                    with contextlib.suppress(OSError):
                        sets.add(format_cpus(os.sched_getaffinity(int(tid))))
                out[f"{q.name()}[{q.pid}]"] = " | ".join(sorted(sets))
    return out
