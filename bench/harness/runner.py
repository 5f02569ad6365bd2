"""Runs a benchmark invocation: request files, system starts, the schedule of units (warm-up,
then one measured phase), budgets and deadline, and results.json after every unit."""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import shlex
import sys
import time
import traceback

from . import elapsed, host, log, schedule
from .config import engine_config, parse_gpu_share
from .placement import Placement
from .processes import project_paths
from .systems import Resources, make_system, parse_systems
from .workloads import (
    FRESH_PHASE,
    default_photos,
    fresh_phase,
    phases_of,
    seed,
    warmup_requests,
    workload_specs,
)


class Bench:
    def __init__(self, args):
        self.a = args
        self.e = engine_config(args.engine_args, args.cpu)
        self.specs = workload_specs(args)
        self.placement = Placement(args.front_door_cpus, args.engine_cpus, args.loadgen_cpus, args.vllm_cpus)
        self.shares = parse_gpu_share(args.gpu_share)
        self.sysdefs = parse_systems(args.systems)
        if args.co_resident and self.shares == (None, {}) and not args.cpu:
            self.shares = (auto_share(self.sysdefs), {})
        os.makedirs(args.out, exist_ok=True)
        self.log_dir = os.path.join(args.out, ".logs")
        os.makedirs(self.log_dir, exist_ok=True)
        self.res = Resources(args, self.e, self.log_dir, self.placement)
        # Configuration errors (a missing flag for ours-stock or ceiling-fast) stop here, before any start.
        self.systems = {d["name"]: make_system(d, args, self.e, self.log_dir, self.res, self.placement, self.shares)
                        for d in self.sysdefs}
        self.phases = {w: phases_of(w, spec) for w, spec in self.specs.items()}
        fresh = [s.strip() for s in (args.fresh_burst or "").split(",") if s.strip()]
        unknown = [s for s in fresh if s not in self.systems]
        if unknown:
            raise SystemExit(f"--fresh-burst {unknown}: not in --systems")
        self.units = schedule.build([d["name"] for d in self.sysdefs],
                                    [(w, ph["phase"]) for w, phs in self.phases.items() for ph in phs],
                                    repeats=args.repeats, overrides=schedule.parse_repeats_for(args.repeats_for),
                                    fresh=fresh, order=args.order, co_resident=args.co_resident,
                                    phase_systems=schedule.parse_phase_systems(args.phase_systems, list(self.systems)),
                                    late=[x.strip() for x in args.late.split(",") if x.strip()])
        self.results = {"schema": 2, "invocations": [self.invocation()], "runs": []}
        self._reqs: dict = {}
        self._payloads: dict = {}  # the ceiling's prepared payloads, (workload, phase, repeat) -> list
        self._uses: dict = {}      # how many ceiling units still need them

    def invocation(self) -> dict:
        a = self.a
        return {"argv": [sys.executable, *sys.argv], "cmd": shlex.join([sys.executable, *sys.argv]),
                "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                # the clock of window_s and t_start/t_end: time.perf_counter() (CLOCK_MONOTONIC, one for
                # every process of the machine) at this value; probes in the servers align by it
                "clock_t0_perf_counter_s": _t0(),
                "host": host.node(), "cpu": host.cpu_model(), "cores": os.cpu_count(), "mem_gib": host.mem_gib(),
                "gpu": host.gpu_name(), "versions": host.versions(), "git": host.git(),
                "model": os.path.abspath(a.model), "mode": "cpu" if a.cpu else "gpu", "engine": self.e,
                "workloads": self.specs, "slo_ttft_p90_s": a.slo_ttft_p90_s, "systems": a.systems,
                "cpu_repack": a.cpu_repack, "co_resident": a.co_resident, "order": a.order,
                "repeats": a.repeats, "repeats_for": a.repeats_for, "phase_systems": a.phase_systems, "late": a.late, "warmup_per_unit": a.warmup,
                "gpu_shares": {n: s.info["gpu_share"] for n, s in self.systems.items()},
                "placement": self.placement.as_dict(),
                "vllm_serve_count_tokens": "return_token_ids" if not a.vllm_no_token_ids else "usage",
                "project_paths": project_paths(), "vllm_plugins": a.vllm_plugins,
                "schedule": self.units,
                "notes": ["vllm serve keeps its default multimodal processor cache; ours and the ceiling run with "
                          "mm_processor_cache_gb=0 (requests arrive preprocessed)",
                          "ITL per request = (last token time - first token time) / (tokens - 1); p50/p90 over "
                          "requests", "CPU utilisation: whole machine, load generator included"]}

    # ------------------------------------------------------------------------ request files
    def phase_def(self, w: str, phase: str, repeat: int) -> dict:
        if phase == FRESH_PHASE:
            return fresh_phase(self.specs, self.a.cpu)
        return next(ph for ph in phases_of(w, self.specs[w], repeat) if ph["phase"] == phase)

    def requests(self, w: str, phase: str, repeat: int):
        """A unit's requests, built once per invocation and shared by every system."""
        import loadgen as lg

        key = (w, phase, repeat)
        if key not in self._reqs:
            ph = self.phase_def(w, phase, repeat)
            t = time.perf_counter()
            if ph.get("pages"):
                lg.prerender_documents(ph["pages"])
            reqs = lg.build_requests(ph["make"], ph["n"])
            self._reqs[key] = (reqs, lg.payload_sha256(reqs))
            nbytes = sum(len(b) for r in reqs for b in r.images)
            log(f"built {w}/{phase} repeat {repeat}: {len(reqs)} requests, {nbytes / 2**20:.1f} MiB of images, "
                f"{time.perf_counter() - t:.1f} s")
        return self._reqs[key]

    def save(self):
        path = os.path.join(self.a.out, "results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.results, f, separators=(",", ":"))
        os.replace(path + ".tmp", path)

    # ------------------------------------------------------------------------ the invocation
    async def run(self):
        import loadgen as lg

        a = self.a
        t = time.perf_counter()
        for u in self.units:  # every request file, before any system starts (on every CPU: nothing runs yet)
            self.requests(u["workload"], u["phase"], u["repeat"])
        log(f"request files ready in {time.perf_counter() - t:.1f} s")
        self.placement.apply_to_self()
        for line in schedule.describe(self.units):
            log("order:", line)
        self.samplers = lg.Samplers()
        self.results["invocations"][0]["gpu_sampler"] = self.samplers.gpu_name is not None
        self.runs = {}
        for name, s in self.systems.items():
            self.runs[name] = {"system": name, "kind": s.kind, "variant": s.d["variant"], "invocation": 0,
                               "phases": [], "skipped": [], "info": s.info}
            self.results["runs"].append(self.runs[name])
        self.overloaded: set = set()
        self.spent: dict[str, float] = {}
        prefetch = None
        try:
            ceil_units = [u for u in self.units if self.systems[u["system"]].kind == "ceiling"]
            for u in ceil_units:
                k = self._pkey(u["system"], u["workload"], u["phase"], u["repeat"])
                self._uses[k] = self._uses.get(k, 0) + 1
            if ceil_units and a.ceiling_prefetch_gib > 0:
                prefetch = asyncio.create_task(self.prefetch(ceil_units))
            if a.co_resident:
                for name in self.systems:  # one at a time: each engine sizes its KV cache from what is free
                    await self.start(name)
            rounds_checked: set = set()
            for u in self.units:
                await self.run_unit(u, rounds_checked)
                self.save()
        finally:
            if prefetch is not None:
                prefetch.cancel()
                with contextlib.suppress(BaseException):
                    await prefetch
            for proc in self._procs():  # all drain at once; the stops below then only wait
                proc.terminate()
            for s in self.systems.values():
                with contextlib.suppress(Exception):
                    await self.stop(s)
            with contextlib.suppress(Exception):
                await self.res.release_unused()
            self.samplers.close()
            self.results["invocations"][0]["samples"] = self.samplers.series(_t0())
            self.save()

    def _procs(self) -> list:
        procs = [t.proc for t in self.res.tiers.values()]
        procs += [getattr(s, "pre", None) or getattr(s, "proc", None) for s in self.systems.values()]
        return [p for p in procs if p is not None]

    async def start(self, name: str) -> bool:
        """Start a system (its reinit included); False if it cannot run."""
        a, s, run = self.a, self.systems[name], self.runs[name]
        if s.started:
            return True
        if run.get("error"):
            return False
        if not a.co_resident:  # one at a time: stop the others, keep what this one shares with them
            for other in self.systems.values():
                if other is not s and other.started:
                    await self.stop(other)
            await self.res.release_unused(keep=() if a.no_share_inference else s.resources())
        left = a.deadline_s - elapsed() if a.deadline_s else None
        if left is not None and left < a.min_system_s:
            run["error"] = f"skipped: {left:.0f} s left of --deadline-s"
            log(name, run["error"])
            return False
        log(f"=== {name}: starting")
        t = time.perf_counter()
        try:
            await s.start()
            if s.kind != "ours":
                if a.prove_reinit if a.prove_reinit is not None else a.cpu:
                    await s.before_unit()
                    run["probe_before_reinit"] = await self.probe(s, "probe0")
                run["reinit"] = await s.reinit()
                log(f"{name} reinit: {run['reinit']}")
            s.record_placement()
            run["start_wall_s"] = round(time.perf_counter() - t, 1)
            log(f"{name} up in {run['start_wall_s']} s: " + json.dumps(
                {k: v for k, v in s.info.items() if k not in ("engine_kwargs", "cpus_in_force")})[:1500])
            return True
        except Exception as e:  # noqa: BLE001 - recorded; the other systems still run
            run["error"] = f"{type(e).__name__}: {e}"
            log(f"{name} FAILED to start: {run['error']}")
            traceback.print_exc()
            with contextlib.suppress(Exception):
                await self.stop(s)
            return False

    async def stop(self, s) -> None:
        if not s.started and getattr(s, "sender", None) is None:
            return
        t = time.perf_counter()
        await s.stop()  # its shared servers stay until release_unused (the next system may use them)
        self.runs[s.name]["stop_s"] = round(time.perf_counter() - t, 1)
        log(f"=== {s.name}: stopped")

    # ------------------------------------------------------------------------ units
    def _skip(self, u, why: str) -> None:
        u["status"], u["reason"] = "skipped", why
        self.runs[u["system"]]["skipped"].append(f"{u['workload']}/{u['phase']} r{u['repeat']}: {why}")

    def _estimate(self, u) -> float | None:
        """Seconds a unit will take (warm-up included), from this invocation's units so far."""
        done = [x for x in self.units if x.get("wall_s") is not None and x["workload"] == u["workload"]
                and x["phase"] == u["phase"]]
        same = [x for x in done if x["system"] == u["system"]]
        pick = same[-1:] or done
        if pick:
            return max(x["wall_s"] + x.get("warmup_s", 0.0) for x in pick)
        ph = self.phase_def(u["workload"], u["phase"], u["repeat"])
        if ph["pattern"] == "poisson":
            return ph["n"] / ph["rate"] + 5.0
        return None

    async def run_unit(self, u: dict, rounds_checked: set) -> None:
        a, name = self.a, u["system"]
        s, run = self.systems[name], self.runs[name]
        w, phase, r = u["workload"], u["phase"], u["repeat"]
        label = f"{name} {w}/{phase} r{r + 1}"
        if a.co_resident and not u.get("fresh") and (u["round"], w, phase) not in rounds_checked:
            # a round runs whole or not at all, so that every ratio of it has both sides
            rounds_checked.add((u["round"], w, phase))
            rest = [x for x in self.units if (x["round"], x["workload"], x["phase"]) == (u["round"], w, phase)]
            est = [self._estimate(x) for x in rest]
            if a.deadline_s and all(e is not None for e in est):
                need, left = sum(est), a.deadline_s - 10 - elapsed()
                if need > left:
                    for x in rest:
                        self._skip(x, f"round would not fit (~{need:.0f} s needed, {left:.0f} s left)")
        if u.get("status"):
            return
        if run.get("error") or not await self.start(name):
            self._skip(u, "system not running")
            return
        if a.budget_s and self.spent.get(name, 0.0) > a.budget_s:
            return self._skip(u, f"--budget-s {a.budget_s:.0f} spent")
        if a.deadline_s and elapsed() > a.deadline_s - 20:
            return self._skip(u, "--deadline-s reached")
        if (name, w, r) in self.overloaded and phase.startswith("poisson") and not a.no_stop_overloaded:
            return self._skip(u, "a lower rate already missed the TTFT target by 3x")
        try:
            if not u.get("fresh") and "probe" not in run:
                await s.before_unit()
                run["probe"] = await self.probe(s, "probe")
                log(f"{name} probe: A {run['probe']['A'][:8]} B {run['probe']['B'][:8]}")
                run["info"]["kv_check"] = self.kv_check(s, run["probe"])
            u["mode"] = await s.before_unit()
            t = time.perf_counter()
            if not u.get("fresh"):
                await self.warmup(s, w, phase, r)
            u["warmup_s"] = round(time.perf_counter() - t, 2)
            limit = None
            if a.budget_s:
                limit = max(10.0, a.budget_s - self.spent.get(name, 0.0))
            if a.deadline_s:  # a unit begun before the deadline's last 20 s must end by then
                left = a.deadline_s - 10 - elapsed()
                limit = left if limit is None else min(limit, left)
            u["t_start"] = round(elapsed(), 2)
            res = await self.run_phase(s, w, phase, r, limit)
            res.update({"repeat": r, "seq": u["seq"], "round": u["round"], "fresh": bool(u.get("fresh")),
                        "warmup_s": u["warmup_s"], "placement": s.info["placement"], "mode": u["mode"]})
            run["phases"].append(res)
            sm = res["summary"]
            u.update(status="ok", wall_s=sm["wall_s"], t_end=round(elapsed(), 2))
            self.spent[name] = self.spent.get(name, 0.0) + sm["wall_s"]
            log(f"{label}: " + ", ".join(f"{k}={sm.get(k)}" for k in (
                "ok", "errors", "req_per_s", "ttft_p50_s", "ttft_p90_s", "itl_p50_ms", "engine_core_cpu_s_per_req")))
            if res["pattern"] == "poisson" and (sm.get("ttft_p90_s") is None or sm["ttft_p90_s"] > 3 * a.slo_ttft_p90_s
                                                or sm["errors"] > 0.1 * sm["n"]):
                self.overloaded.add((name, w, r))
        except Exception as e:  # noqa: BLE001 - recorded; the next unit still runs
            u["status"], u["reason"] = "failed", f"{type(e).__name__}: {e}"[:300]
            run.setdefault("unit_errors", []).append(f"{label}: {u['reason']}")
            log(f"{label} FAILED: {u['reason']}")
            traceback.print_exc()

    def kv_check(self, s, probe: dict) -> dict | None:
        """Whether the KV cache holds a photo burst at max_num_seqs: min(seqs, n) x (prompt +
        output tokens), the prompt from the probe (same photo size). An upper bound of what a
        burst needs at once (requests not yet scheduled hold no KV)."""
        kv = s.kv_tokens()
        spec = default_photos(self.specs, self.a.cpu)
        n = spec["n"] or 0
        p = probe.get("A_prompt_tokens")
        if kv is None or not p or not n:
            return {"kv_cache_tokens": kv, "note": "not checked (KV size or prompt length unknown, or no burst)"}
        need = min(self.e["max_num_seqs"], n) * (p + int(spec["tokens"]))
        out = {"kv_cache_tokens": kv, "burst_need_tokens": need, "enough": kv >= need,
               "basis": f"min(max_num_seqs {self.e['max_num_seqs']}, burst {n}) x ({p} prompt + {spec['tokens']} out)"}
        if kv < need:
            log(f"WARNING {s.name}: KV cache {kv:,} tokens < {need:,} for a full burst at max_num_seqs "
                f"({out['basis']}): requests may queue for KV")
        return out

    async def warmup(self, s, w: str, phase: str, r: int):
        """Untimed, the same for every system of a unit: the first image requests of a fresh
        engine JIT-compile kernels (seconds on a GPU), and a system that sat idle while others
        ran gets going again."""
        import loadgen as lg

        n = self.a.warmup
        if n <= 0:
            return
        spec = self.specs.get(w, default_photos(self.specs, self.a.cpu))
        reqs = warmup_requests(w, spec, phase, r, n, default_photos(self.specs, self.a.cpu))
        payloads = [await s.sender.prepare(q) for q in reqs]
        recs = [lg.Record(q.key) for q in reqs]
        await lg.run_sequential(s.sender, payloads[:1], recs[:1], timeout_s=self.a.request_timeout_s)
        await lg.run_burst(s.sender, payloads[1:], recs[1:], timeout_s=self.a.request_timeout_s)
        bad = [x.error for x in recs if x.error]
        if bad:
            raise RuntimeError(f"warm-up failed: {bad[0]}")

    async def probe(self, s, tag: str) -> dict:
        """Two greedy requests with different images: their outputs must differ (the image
        matters), and each image's ids must match across systems (same weights)."""
        import loadgen as lg

        from .workloads import mp_range
        lo, hi = mp_range(default_photos(self.specs, self.a.cpu)["mp"])
        out = {}
        extra = s.probe_extra()
        for name in ("A", "B"):
            req = lg.Req(f"{tag}/{name}", [lg.photo_jpeg(seed(tag, name), lo, hi), "What is in this picture?"],
                         self.a.probe_tokens)
            rec = lg.Record(req.key)
            await lg._one(s.sender, await s.sender.prepare(req, extra), rec, self.a.request_timeout_s, want_ids=True)
            if rec.error:
                raise RuntimeError(f"probe failed: {rec.error}")
            out[name] = rec.token_ids
            out[f"{name}_prompt_tokens"] = rec.prompt_tokens
            if rec.server.get("logprobs"):
                out[f"{name}_logprobs"] = rec.server["logprobs"]
        out["ids_differ"] = out["A"] != out["B"]
        if "A_logprobs" in out:
            out["logprobs_differ"] = out["A_logprobs"] != out["B_logprobs"]
        return out

    # ------------------------------------------------------------------------ the ceiling's payloads
    async def prefetch(self, units: list[dict]):
        """Prepare the ceiling's payloads while the systems start (nothing is measured then), up
        to --ceiling-prefetch-gib; the rest are prepared before their phase."""
        eng = self.res.ceiling_engine()
        limit = self.a.ceiling_prefetch_gib * 2**30
        for u in units:
            k = self._pkey(u["system"], u["workload"], u["phase"], u["repeat"])
            if k in self._payloads:
                continue
            sender = eng.tools(raw=k[3])
            held = eng.sender.prepared_bytes + eng.sender_raw.prepared_bytes
            if held > limit:
                log(f"ceiling prefetch: stopped at {held / 2**30:.1f} GiB")
                return
            reqs, _ = self.requests(*k[:3])
            t = time.perf_counter()
            self._payloads[k] = await asyncio.gather(*(sender.prepare(q) for q in reqs))
            log(f"ceiling prefetch: {k[0]}/{k[1]} repeat {k[2]}{' raw' if k[3] else ''} in "
                f"{time.perf_counter() - t:.1f} s")

    def _pkey(self, system: str, w: str, phase: str, r: int):
        """The ceiling's payloads differ by whether the engine takes raw pixels (ceiling-fast)."""
        return (w, phase, r, self.systems[system].d["variant"] == "fast")

    async def ceiling_payloads(self, s, k, reqs):
        got = self._payloads.get(k)
        self._uses[k] = self._uses.get(k, 1) - 1
        if got is None:
            got = await asyncio.gather(*(s.sender.prepare(q) for q in reqs))
            if self._uses[k] > 0:
                self._payloads[k] = got
            return got, False
        if self._uses[k] <= 0:
            del self._payloads[k]
        return got, True

    def _idle_roles(self, s) -> dict[str, dict]:
        """The processes of the other started systems (not this process, not s's own)."""
        mine = set(s.roles.values())
        out = {}
        for n, o in self.systems.items():
            if o is s or not o.started:
                continue
            r = {k: v for k, v in o.roles.items() if k != "bench" and v not in mine}
            if r:
                out[n] = r
        return out

    # ------------------------------------------------------------------------ one measured phase
    async def run_phase(self, s, w, phase, r, limit_s) -> dict:
        import loadgen as lg

        a = self.a
        ph = self.phase_def(w, phase, r)
        spec = self.specs.get(w) or default_photos(self.specs, a.cpu)
        reqs, sha = self.requests(w, phase, r)
        t = time.perf_counter()
        prefetched = False
        if s.kind == "ceiling":
            payloads, prefetched = await self.ceiling_payloads(s, self._pkey(s.name, w, phase, r), reqs)
        else:
            payloads = [await s.sender.prepare(q) for q in reqs]
        prep_s = round(time.perf_counter() - t, 2)
        recs = [lg.Record(q.key) for q in reqs]
        phase_limit = a.phase_limit_s if ph["pattern"] != "poisson" else ph["n"] / ph["rate"] + a.drain_s
        if limit_s is not None:
            phase_limit = min(phase_limit, limit_s)
        idle = self._idle_roles(s)
        idle0 = {n: lg.cpu_seconds_by_process(r) for n, r in idle.items()}
        by_proc0, own0 = lg.cpu_seconds_by_process(s.roles, s.alone), time.process_time()
        w0 = time.perf_counter()
        kw = {"timeout_s": a.request_timeout_s, "limit_s": phase_limit}
        if ph["pattern"] == "burst":
            t0 = await lg.run_burst(s.sender, payloads, recs, **kw)
        elif ph["pattern"] == "closed":
            t0 = await lg.run_closed(s.sender, payloads, recs, concurrency=ph["concurrency"],
                                     stagger_s=ph["stagger_s"], **kw)
        elif ph["pattern"] == "poisson":
            t0 = await lg.run_poisson(s.sender, payloads, recs, rate=ph["rate"], seed=seed(w, phase, "arrivals"), **kw)
        else:
            t0 = await lg.run_sequential(s.sender, payloads, recs, **kw)
        w1 = time.perf_counter()
        by_proc = lg.cpu_delta_by_label(by_proc0, lg.cpu_seconds_by_process(s.roles, s.alone))
        idle_cpu = {n: round(sum(lg.cpu_delta_by_label(idle0[n], lg.cpu_seconds_by_process(r)).values()), 2)
                    for n, r in idle.items()}
        own_cpu = time.process_time() - own0
        del payloads
        jrecs = [x.to_json(t0, keep_chunks=not a.no_chunks) for x in recs]
        summary = lg.summarize(jrecs, offered_rate=ph.get("rate"))
        if ph["pattern"] == "closed":  # steps stand apart only below saturation, as in the decode loop
            summary["engine_steps"] = lg.engine_steps(jrecs, skip_s=ph.get("stagger_s") or 0.0)
        await self.samplers.settle(w1)
        summary.update(self.samplers.window(w0, w1))
        summary["wall_s"] = round(w1 - w0, 3)
        summary["window_s"] = [round(w0 - _t0(), 3), round(w1 - _t0(), 3)]  # in the invocation's samples' clock
        summary["loadgen_cpu_pct"] = round(100 * own_cpu / max(w1 - w0, 1e-9), 1)
        n = max(1, len(recs))
        if s.kind != "ceiling":
            summary["server_cpu_s_per_req"] = round(sum(by_proc.values()) / n, 4)
        # Per process (the ceiling's engine core is this process's child): which one does the work.
        summary["cpu_s_per_req_by_process"] = {k: round(v / n, 4) for k, v in sorted(by_proc.items())}
        if idle_cpu:  # what the co-resident systems that sat idle used meanwhile (they should not spin)
            summary["idle_systems_cpu_s"] = idle_cpu
        core = [v for k, v in by_proc.items() if ENGINE_PROCS.search(k)]
        summary["engine_core_cpu_s_per_req"] = round(sum(core) / n, 4) if core else None
        return {"workload": w, "phase": phase, "pattern": ph["pattern"], "rate": ph.get("rate"),
                "concurrency": ph.get("concurrency"), "n": ph["n"], "spec": spec, "payload_sha256": sha,
                "prepare_s": prep_s, "prefetched": prefetched, "summary": summary, "records": jrecs}


# The engine's processes: its core (VLLM::EngineCore, where a single GPU's model runs too) and any
# separate worker process (the CPU backend's VLLM::Worker).
ENGINE_PROCS = re.compile(r"EngineCor|VLLM::Worker")


def _t0() -> float:
    from . import T0
    return T0


def auto_share(sysdefs: list[dict]) -> float:
    """GPU memory per engine when co-resident and --gpu-share is not given: 0.93 of the GPU split
    evenly (ours:N of one variant share a tier, both ceiling systems one engine)."""
    engines = len({("ours", d["variant"]) if d["kind"] == "ours" else ("ceiling",) if d["kind"] == "ceiling"
                   else (d["name"],) for d in sysdefs})
    return min(0.85, int(93 / max(1, engines)) / 100)
