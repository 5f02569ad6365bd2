"""The serving benchmark's parts (``bench/serving.py`` is its command line).

    config      engine arguments, one list rendered for each system (vLLM's flag spelling)
    workloads   workloads, their phases and request files, warm-up requests
    processes   server processes, ports, health waits, environment, server logs
    placement   CPU placement (front door, inference tier + engine, load generator)
    systems     the systems: ours (fast path / stock), vllm serve, the in-process engine ceiling
    schedule    the order of measured units: repeats interleaved across co-resident systems
    runner      starts the systems, runs warm-ups and phases, budgets, results.json
    host        facts about the machine and versions
    results     reading results: phase cells across repeats and invocations, medians, spreads
    report      summary.md: goals, ratios with spread, per-phase tables, order, placement; --merge
    plots       ttft.png, throughput.png, itl.png

Everything here runs in the benchmark process; ``bench/loadgen.py`` holds the request files,
clients and arrival patterns, ``bench/reinit_ext.py`` the worker extension vLLM loads.
"""
from __future__ import annotations

import time

T0 = time.perf_counter()


def log(*a) -> None:
    print(f"[serving {time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def elapsed() -> float:
    """Seconds since the benchmark process started (the clock of --deadline-s)."""
    return time.perf_counter() - T0
