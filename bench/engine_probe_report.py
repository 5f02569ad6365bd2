"""What reached each system's engine core in a serving run, side by side (bench/engine_probe/).

Run ``bench/serving.py`` with the probe on (``KIMIVL_ENGINE_PROBE_DIR=DIR
PYTHONPATH=bench/engine_probe``), then::

    python bench/engine_probe_report.py RESULTS.json[.gz] DIR [--phase photos/burst] [--out FILE.md]

Each engine core's probe file is matched to its system by pid (``cpus_in_force`` in results.json),
each measured unit by its time window (``window_s`` + ``clock_t0_perf_counter_s``: the probe and the
benchmark share CLOCK_MONOTONIC). Per unit: when the requests reached the core (seconds after the
unit began), the steps (requests scheduled, prefills, prefill tokens, encoder inputs per step; the
main thread's CPU per step and per request), the input thread's CPU per request, and CPU-seconds per
request of every thread of the core and its worker (threads of one name summed; ``native:`` = not
a Python thread, e.g. OpenMP workers). Then each system's request as the core received it, with
the fields that vary per request (ids, hashes, times) masked, and whether all requests agree.
First, each engine process's torch thread count, CPU set and OMP environment as it reported them.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics as st

VARYING = {"request_id", "external_req_id", "arrival_time", "identifier", "mm_hash", "offset", "length",
           "prompt_token_ids", "shape", "_all_stop_token_ids", "output_text_buffer_length", "seed"}


def load_json(path: str):
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
        return json.load(f)


def load_probe(d: str) -> dict[int, list[dict]]:
    out = {}
    for p in glob.glob(os.path.join(d, "*.jsonl")):
        recs = []
        with open(p) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        recs.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line cut by a kill
        out[int(os.path.basename(p).split(".")[0])] = recs
    return out


def mask(x, key: str = ""):
    if key in VARYING:
        return "*"
    if isinstance(x, dict):
        return {k: mask(v, k) for k, v in x.items()}
    if isinstance(x, list):
        return [mask(v, key) for v in x]
    return x


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))] if xs else None


def thread_cpu(snap: dict, pids: set[int]) -> dict[str, float]:
    """CPU seconds by (process comm, thread name) over the given pids, from one threads snapshot."""
    out: dict[str, float] = collections.Counter()
    for pid, p in snap["procs"].items():
        if int(pid) not in pids:
            continue
        for _tid, name, u, s in p["threads"]:
            out[f"{p['comm']} · {re.sub(r'_[0-9]+$', '_N', name)}"] += u + s
    return out


def snaps_around(snaps: list[dict], t0: float, t1: float):
    before = [s for s in snaps if s["t"] <= t0]
    after = [s for s in snaps if s["t"] >= t1]
    return (before[-1] if before else None), (after[0] if after else None)


def system_pids(run: dict) -> set[int]:
    pids = set()
    for role, procs in (run.get("info", {}).get("cpus_in_force") or {}).items():
        for k in procs:
            m = re.search(r"\[(\d+)\]$", k)
            if m and ("EngineCore" in k or "Worker" in k or "EngineCore" in role):
                pids.add(int(m.group(1)))
    return pids


def engine_processes(res: dict, probe: dict[int, list[dict]]) -> list[str]:
    """Each system's probed processes as they first reported: torch threads, CPUs, environment."""
    out = []
    for run in res["runs"]:
        for pid in sorted(system_pids(run)):
            info = next((r for r in probe.get(pid, []) if r["kind"] == "proc"), None)
            if info:
                env = {k: v for k, v in info.get("env", {}).items() if k.startswith(("OMP_", "VLLM_WORKER"))}
                out.append(f"| {run.get('system')} | {info.get('comm')} [{pid}] | {info.get('torch_threads')} | "
                           f"{len(info.get('affinity', []))} | {json.dumps(env)} |")
    return out


def unit_rows(res: dict, probe: dict[int, list[dict]], phase_filter: str | None):
    t0c = res["invocations"][0].get("clock_t0_perf_counter_s")
    if t0c is None:
        raise SystemExit("results.json has no clock_t0_perf_counter_s: run serving.py from this tree")
    rows, reqs_by_system = [], collections.defaultdict(list)
    for run in res["runs"]:
        name = run.get("system") or run.get("name")
        pids = system_pids(run)
        recs = [r for pid in pids for r in probe.get(pid, [])]
        snaps = sorted((r for pid in pids for r in probe.get(pid, []) if r["kind"] == "threads"), key=lambda r: r["t"])
        # one snapshot per flush of each process: merge those of the core and its worker by time
        for ph in run.get("phases", []):
            key = f"{ph['workload']}/{ph['phase']}"
            if phase_filter and not re.fullmatch(phase_filter, key):
                continue
            w0, w1 = (t0c + x for x in ph["summary"]["window_s"])
            n = ph["n"]
            reqs = [r for r in recs if r["kind"] == "req" and w0 - 0.05 <= r["t"] <= w1]
            steps = [r for r in recs if r["kind"] == "step" and w0 <= r["t"] <= w1]
            ex = [s for s in steps if s.get("executed")]
            pre = [s for s in ex if s.get("prefill_reqs")]
            arr = [r["t"] - w0 for r in reqs]
            row = {"system": name, "phase": key, "repeat": ph["repeat"] + 1, "n": n,
                   "req_s": ph["summary"].get("req_per_s"), "reqs_seen": len(reqs),
                   "arrive_p50_s": pct(arr, .5), "arrive_max_s": max(arr) if arr else None,
                   "steps": len(ex), "steps_per_req": len(ex) / n,
                   "sched_per_step": st.mean(s.get("n_sched", 0) for s in ex) if ex else None,
                   "prefill_steps": len(pre),
                   "prefills_per_prefill_step": st.mean(s["prefill_reqs"] for s in pre) if pre else None,
                   "prefill_tok_per_prefill_step": st.mean(s["prefill_tokens"] for s in pre) if pre else None,
                   "enc_per_prefill_step": st.mean(s.get("enc_inputs", 0) for s in pre) if pre else None,
                   "main_cpu_s_per_req": sum(s["cpu_s"] for s in steps) / n,
                   "main_wall_s_per_req": sum(s["wall_s"] for s in steps) / n,
                   "sched_cpu_ms_per_step": 1e3 * st.mean(s.get("sched_cpu_s", 0) for s in ex) if ex else None,
                   "input_cpu_ms_per_req": 1e3 * sum(r["pre_cpu_s"] for r in reqs) / max(1, len(reqs)),
                   "engine_core_cpu_s_per_req": ph["summary"].get("engine_core_cpu_s_per_req"),
                   "threads": None}
            # per-thread CPU over the unit: for each process, its snapshot before and after the window
            # (the core's children, e.g. the CPU backend's worker, come and go in the snapshots)
            by_pid = collections.defaultdict(list)
            for s in snaps:
                for pid, p in s["procs"].items():
                    by_pid[int(pid)].append({"t": s["t"], "procs": {pid: p}})
            tc: dict[str, float] = collections.Counter()
            for pid, series in by_pid.items():
                a, b = snaps_around(series, w0, w1)
                if a and b:
                    ca, cb = thread_cpu(a, {pid}), thread_cpu(b, {pid})
                    for k in cb:
                        tc[k] += cb[k] - ca.get(k, 0.0)
                    row["threads_span_s"] = max(row.get("threads_span_s", 0), round(b["t"] - a["t"], 1))
            row["threads"] = {k: v / n for k, v in sorted(tc.items(), key=lambda kv: -kv[1]) if v / n >= 0.0005}
            rows.append(row)
            reqs_by_system[name] += reqs
    return rows, reqs_by_system


def fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def report(rows, reqs_by_system, procs: list[str] | None = None) -> str:
    out = []
    if procs:
        out += ["## Engine processes (as each first reported)", "",
                "| system | process | torch threads | CPUs | environment |", "|---|---|---:|---:|---|", *procs, ""]
    out += ["## Per unit (one system, one phase, one repeat)", "",
           "| system | phase | r | req/s | reqs at core | arrive p50 / max s | steps | steps/req | reqs/step | "
           "prefill steps | prefills/prefill step | prefill tok/prefill step | enc inputs/prefill step | "
           "main thread CPU-s/req (steps) | sched ms/step | input thread ms/req | engine CPU-s/req (psutil) |",
           "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['system']} | {r['phase']} | {r['repeat']} | {fmt(r['req_s'], 2)} | {r['reqs_seen']} | "
                   f"{fmt(r['arrive_p50_s'], 2)} / {fmt(r['arrive_max_s'], 2)} | {r['steps']} | "
                   f"{fmt(r['steps_per_req'], 2)} | {fmt(r['sched_per_step'], 1)} | {r['prefill_steps']} | "
                   f"{fmt(r['prefills_per_prefill_step'], 2)} | {fmt(r['prefill_tok_per_prefill_step'], 0)} | "
                   f"{fmt(r['enc_per_prefill_step'], 2)} | {fmt(r['main_cpu_s_per_req'], 4)} | "
                   f"{fmt(r['sched_cpu_ms_per_step'], 2)} | {fmt(r['input_cpu_ms_per_req'], 2)} | "
                   f"{fmt(r['engine_core_cpu_s_per_req'], 4)} |")
    out += ["", "## CPU-s per request by thread (engine core and its worker; snapshots around each unit)", ""]
    for r in rows:
        th = ", ".join(f"{k} {v:.4f}" for k, v in r["threads"].items())
        out.append(f"- {r['system']} {r['phase']} r{r['repeat']} (span {r.get('threads_span_s', '-')} s): {th}")
    out += ["", "## Requests as the engine core received them (per-request values masked)", ""]
    for name, reqs in reqs_by_system.items():
        sigs = collections.Counter(json.dumps(mask(r["req"]), sort_keys=True) for r in reqs)
        out.append(f"### {name}: {len(reqs)} requests, {len(sigs)} distinct shape(s)")
        for sig, k in sigs.most_common(3):
            out += ["", f"{k} requests:", "```json", json.dumps(json.loads(sig), indent=1)[:6000], "```"]
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results")
    p.add_argument("probe_dir")
    p.add_argument("--phase", default=None, help="regex over workload/phase, e.g. 'photos/burst'")
    p.add_argument("--out", default=None)
    p.add_argument("--json", default=None, help="also write the per-unit rows here")
    a = p.parse_args()
    res, probe = load_json(a.results), load_probe(a.probe_dir)
    rows, reqs = unit_rows(res, probe, a.phase)
    text = report(rows, reqs, engine_processes(res, probe))
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
