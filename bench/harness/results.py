"""Reading results.json: measured phases as cells (system, workload, phase) over repeats and
invocations, medians and spreads, and ratios of two systems paired repeat by repeat.

A ratio is only formed between measurements of one invocation and one repeat (side by side, in
the same round); results of older runs without repeats are repeat 0 of their invocation.
"""
from __future__ import annotations

import statistics

from .workloads import FRESH_PHASE, WORKLOADS

KIND_ORDER = {"ours": 0, "vllm": 1, "ceiling": 2}


def entries(results: dict) -> list[dict]:
    out = []
    for run in results["runs"]:
        for ph in run.get("phases", []):
            out.append({"inv": run.get("invocation", 0), "system": run["system"], "kind": run["kind"],
                        "variant": run.get("variant"), "workload": ph["workload"], "phase": ph["phase"],
                        "repeat": ph.get("repeat", 0), "seq": ph.get("seq"), "fresh": bool(ph.get("fresh")),
                        "placement": ph.get("placement"), "ph": ph, "s": ph["summary"]})
    return out


def cells(results: dict) -> dict[tuple[str, str, str], list[dict]]:
    out: dict = {}
    for e in entries(results):
        out.setdefault((e["system"], e["workload"], e["phase"]), []).append(e)
    for v in out.values():
        v.sort(key=lambda e: (e["inv"], e["repeat"], e["seq"] or 0))
    return out


def system_order(results: dict) -> list[str]:
    names = []
    for run in results["runs"]:
        if run["system"] not in names:
            names.append(run["system"])
    kinds = {run["system"]: run["kind"] for run in results["runs"]}
    return sorted(names, key=lambda n: (KIND_ORDER.get(kinds.get(n), 3), names.index(n)))


def phase_order(results: dict) -> list[tuple[str, str]]:
    seen = []
    for e in entries(results):
        k = (e["workload"], e["phase"])
        if k not in seen:
            seen.append(k)
    wl = list(WORKLOADS)

    def key(k):
        w, p = k
        kind, _, num = p.partition("@")
        return (wl.index(w) if w in wl else 99, p != FRESH_PHASE, kind != "burst", kind, float(num) if num else 0.0)
    return sorted(seen, key=key)


def value(e: dict, metric: str):
    v = e["s"].get(metric)
    if v is None and metric == "engine_core_cpu_s_per_req":  # runs before the field existed
        core = [x for k, x in (e["s"].get("cpu_s_per_req_by_process") or {}).items()
                if "EngineCor" in k or "VLLM::Worker" in k]
        v = sum(core) if core else None
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs, nd: int = 2, all_values: bool = True) -> str:
    """"1.23 [1.20–1.25] (1.23, 1.20, 1.25)": median, min–max, each value in run order."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    m = f"{statistics.median(xs):.{nd}f}"
    if len(xs) == 1:
        return m
    out = f"{m} [{min(xs):.{nd}f}–{max(xs):.{nd}f}]"
    if all_values:
        out += " (" + ", ".join(f"{x:.{nd}f}" for x in xs) + ")"
    return out


def paired(cs: dict, num: str, ref: str, w: str, p: str, metric: str, p_ref: str | None = None):
    """[(invocation, repeat, num value / ref value)] for the repeats both were measured in."""
    a = {(e["inv"], e["repeat"]): value(e, metric) for e in cs.get((num, w, p), [])}
    b = {(e["inv"], e["repeat"]): value(e, metric) for e in cs.get((ref, w, p_ref or p), [])}
    return [(k[0], k[1], a[k] / b[k]) for k in sorted(a) if k in b and a[k] is not None and b[k]]


def across(cs: dict, num: str, ref: str, w: str, p: str, metric: str):
    """Ratio of medians when the two were never measured in one invocation (older merges)."""
    a = median(value(e, metric) for e in cs.get((num, w, p), []))
    b = median(value(e, metric) for e in cs.get((ref, w, p), []))
    return a / b if a is not None and b else None
