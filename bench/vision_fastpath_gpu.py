"""The vision fast path on one engine: exactness, syncs, encoder times, and bursts with the modes
interleaved (stock, fast, stock, fast, ...), in ONE device call.

One vLLM AsyncLLM in this process, started with the project's plugin and KIMIVL_VISION_FASTPATH=1;
the modes are switched inside the engine's worker between phases (collective_rpc), so one engine
start serves every mode. Inside the worker (kimivl_inference.vision_fastpath_probe):
  1. torch.equal of stock vs fast encoder outputs (model.embed_multimodal) for 74x74, 86x116, a mixed
     5-grid call and repeated grids, cold and warm cache; the cache's bounds and invalidation;
  2. GPU->CPU syncs per encoder call (torch.cuda.set_sync_debug_mode), per mode;
  3. encoder time per mode (median of --iters after warm-up), and whether a pageable H2D copy blocks;
then bursts of --n distinct 1024x1024 ready-tensor requests (16 output tokens, greedy, ignore_eos),
modes interleaved, printing req/s per burst and each mode's median and spread, and the engine core's
CPU seconds per request. Stock bursts send bfloat16 patches (normalized beforehand, as the stock tier
does on its CPU); fast bursts send the raw uint8 patches (normalized on the GPU).

GPU (after vLLM 0.26 is staged; see the report or bench/README.md):
  python3 .gpu/build_model_dir.py /tmp/kimivl && python3 bench/vision_fastpath_gpu.py --out $OUT
CPU rehearsal (tiny model, small sizes):
  .venv/bin/python bench/vision_fastpath_gpu.py --cpu --out /tmp/vfp
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T0 = time.perf_counter()

GPU = {
    "grid": (74, 74),  # a 1024x1024 photo
    "exact": {"74x74": [(74, 74)], "86x116": [(86, 116)],
              "mixed5": [(74, 74), (86, 116), (64, 64), (16, 24), (74, 74)], "repeated": [(74, 74)] * 4},
    "timing": {"1x74x74": [(74, 74)], "4x74x74": [(74, 74)] * 4, "1x86x116": [(86, 116)]},
}
CPU = {
    "grid": (38, 38),
    "exact": {"38x38": [(38, 38)], "30x44": [(30, 44)],
              "mixed5": [(38, 38), (30, 44), (64, 64), (16, 24), (38, 38)], "repeated": [(38, 38)] * 3},
    "timing": {"1x38x38": [(38, 38)], "2x30x44": [(30, 44)] * 2},
}
MODES = {  # name -> fast-path components on in the worker, and whether requests carry raw uint8 patches
    "stock": ((), False),
    "fast": (("host_seqlens", "posemb_cache", "raw_pixels", "pinned_h2d"), True),
}
ENCODER_MODES = {  # for the encoder timings: what each component adds
    "stock": (),
    "host_seqlens": ("host_seqlens", "pinned_h2d"),
    "host_seqlens+posemb": ("host_seqlens", "posemb_cache", "pinned_h2d"),
    "fast": ("host_seqlens", "posemb_cache", "raw_pixels", "pinned_h2d"),
}


PAD = [163605]  # <|media_pad|>, set from the tokenizer


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def expose_project() -> None:
    """Make this checkout importable and its vLLM plugin visible in this process and the engine's
    (spawned) processes, whether or not the project is installed: a dist-info with the entry point."""
    # A name of its own: an installed (possibly older) kimivl wheel's entry keeps its name and runs
    # too; the plugin is idempotent.
    d = Path(tempfile.mkdtemp(prefix="kimivl-ep-"))
    info = d / "kimivl_fastpath_bench-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kimivl-fastpath-bench\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(
        "[vllm.general_plugins]\nkimivl_fastpath_bench = kimivl_inference.plugin:register\n")
    paths = [str(ROOT / "services" / "inference"), str(ROOT / "clients" / "python"), str(d)]
    for p in reversed(paths):
        sys.path.insert(0, p)
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + [x for x in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if x])


def children_cpu_s() -> float:
    """User+system CPU seconds of this process's children (the engine core and its workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    me, total = os.getpid(), 0.0
    pids = {me}
    for _ in range(3):  # children, grandchildren
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) in pids:
                continue
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(f[1]) in pids:
                pids.add(int(d.name))
    for pid in pids - {me}:
        try:
            f = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / tick
        except OSError:
            pass
    return total


class GpuSampler:
    """nvidia-smi utilization every 200 ms, averaged per phase."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self.proc = None
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "200"], stdout=subprocess.PIPE, text=True, stderr=subprocess.DEVNULL)
        except OSError:
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append((time.perf_counter(), float(line.split(",")[0])))
            except ValueError:
                pass

    def mean(self, t0, t1):
        xs = [u for t, u in self.samples if t0 <= t <= t1]
        return round(statistics.mean(xs), 1) if xs else None

    def stop(self):
        if self.proc:
            self.proc.terminate()


def make_requests(n, grid, tag, tokens, seed, dtype, normalize=True):
    """n distinct single-image prompts: (ids, raw uint8 patches, their normalization or None, hash)."""
    import numpy as np
    import torch

    from kimivl_contract.processor import ProcessorConfig
    from kimivl_inference.pixels import PixelNormalizer

    h, w = grid
    rng = np.random.default_rng(seed)
    config = ProcessorConfig.from_model_dir(tokens["model"])
    norm = PixelNormalizer(config.image_mean, config.image_std, dtype)
    ids = tokens["head"] + [tokens["pad"]] * (h * w // 4) + tokens["tail"]
    out = []
    for i in range(n):
        raw = torch.from_numpy(rng.integers(0, 256, size=(h * w, 3, 14, 14), dtype=np.uint8))
        out.append((ids, raw, norm(raw) if normalize else None, f"vfp-{tag}-{i}"))
    return out


def engine_input(ids, pixels, grid, content_hash, raw: bool):
    """As kimivl_inference.engine_input.build_engine_input makes it (one image)."""
    import torch
    from transformers import BatchFeature
    from vllm.inputs.engine import mm_input
    from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems, PlaceholderRange

    from kimivl_inference.vision_fastpath import RAW_PIXELS_KEY

    g = torch.tensor([list(grid)], dtype=torch.int64)
    key = RAW_PIXELS_KEY if raw else "pixel_values"
    fields = {key: MultiModalFieldConfig.flat_from_sizes("image", g.prod(-1)),
              "image_grid_hws": MultiModalFieldConfig.batched("image", keep_on_cpu=True)}
    kw = MultiModalKwargsItems.from_hf_inputs(BatchFeature({key: pixels, "image_grid_hws": g}), fields)
    return mm_input(prompt_token_ids=ids, mm_kwargs=kw, mm_hashes={"image": [content_hash]},
                    mm_placeholders={"image": [PlaceholderRange(offset=ids.index(PAD[0]),
                                                                length=grid[0] * grid[1] // 4)]})


async def run_one(engine, inp, rid, params, ttfts, ids_out=None):
    t0 = time.perf_counter()
    first = None
    toks = []
    async for out in engine.generate(inp, params, rid):
        if first is None:
            first = time.perf_counter() - t0
        toks.extend(out.outputs[0].token_ids)
    ttfts.append(first)
    if ids_out is not None:
        ids_out.extend(toks)


async def burst(engine, reqs, grid, raw, params, tag):
    ttfts: list[float] = []
    inputs = [engine_input(ids, r if raw else b, grid, f"{hsh}-{tag}", raw) for ids, r, b, hsh in reqs]
    t0 = time.perf_counter()
    await asyncio.gather(*(run_one(engine, inp, f"{tag}-{i}", params, ttfts) for i, inp in enumerate(inputs)))
    return time.perf_counter() - t0, sorted(ttfts)


async def rpc(engine, res, name, fn, *args):
    """One worker-side probe; a failure is recorded under res["errors"] and the run goes on."""
    try:
        (r,) = await engine.collective_rpc(fn, args=args)
        return r
    except Exception as e:  # noqa: BLE001 - keep the other measurements
        res.setdefault("errors", {})[name] = repr(e)[:1000]
        log(f"{name} FAILED: {e!r}"[:500])
        return None


def save(res, out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "vision_fastpath.json").write_text(json.dumps(res, indent=1, default=str))


def spread(xs):
    return {"median": round(statistics.median(xs), 2), "min": round(min(xs), 2), "max": round(max(xs), 2),
            "spread_pct": round(100 * (max(xs) - min(xs)) / statistics.median(xs), 1)}


async def fastpath_probes(engine, res: dict, sizes: dict, *, cpu: bool, iters: int = 15, warm: int = 3,
                          out_dir=None) -> dict:
    """Steps 1-3 inside the engine's worker (exactness, cache, syncs, encoder times) into ``res``;
    also run by the serving benchmark's ceiling-fast system (bench/harness, --fastpath-probes)."""
    from kimivl_inference import vision_fastpath_probe as probe

    a = argparse.Namespace(cpu=cpu, iters=iters, warm=warm, out_dir=out_dir)
    # 1. exactness
    r = res["exactness"] = await rpc(engine, res, "exactness", probe.exactness, sizes["exact"])
    if r:
        log(f"exactness (torch.equal, stock vs fast float/raw cold/raw warm): {'OK' if r['ok'] else 'FAILED'}")
        for name, c in r["cases"].items():
            log(f"  {name}: " + ", ".join(f"{k}={c[k]['equal']}" for k in ("fast_float", "fast_raw_cold",
                                                                              "fast_raw_warm")))
    r = res["cache_bounds_and_invalidation"] = await rpc(engine, res, "cache", probe.cache_bounds_and_invalidation)
    if r:
        log(f"cache bounds and invalidation: {'OK' if r['ok'] else 'FAILED ' + json.dumps(r)}")
    r = res["attention_inputs"] = await rpc(engine, res, "attention", probe.seqlens_seen_by_attention,
                                            sizes["exact"]["mixed5"])
    log(f"attention inputs: {r}")
    if a.out_dir:
        save(res, a.out_dir)

    # 2. syncs and 3. timings, per mode
    if not a.cpu:
        res["syncs"] = {}
        for case, grids in sizes["exact"].items():
            res["syncs"][case] = {}
            for mode, comps in ENCODER_MODES.items():
                r = await rpc(engine, res, f"syncs {case} {mode}", probe.count_syncs, grids, comps)
                res["syncs"][case][mode] = r and r["syncs"]
                if r and r["messages"]:
                    res.setdefault("sync_messages", {})[f"{case} {mode}"] = r["messages"]
            log(f"syncs per encoder call {case}: {res['syncs'][case]}")
        r = res["pageable_h2d"] = await rpc(engine, res, "pageable_h2d", probe.pageable_h2d_blocks)
        log(f"H2D copy call while GPU work is queued: {r}")
    res["encoder_ms"] = {}
    for case, grids in sizes["timing"].items():
        res["encoder_ms"][case] = {}
        for mode, comps in ENCODER_MODES.items():
            r = await rpc(engine, res, f"time {case} {mode}", probe.time_encoder, grids, comps, a.iters, a.warm)
            if r:
                res["encoder_ms"][case][mode] = r
        row = res["encoder_ms"][case]
        log(f"encoder {case}: " + ", ".join(f"{m} {row[m]['wall_ms']} ms (cpu {row[m]['cpu_return_ms']})"
                                            for m in row))
    if a.out_dir:
        save(res, a.out_dir)

    return res


async def main(a) -> dict:
    expose_project()
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from kimivl_inference import vision_fastpath as vf

    os.environ[vf.ENV] = "1"
    if a.cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    import torch
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from kimivl_devtools.reinit import reinit_dummy_weights

    sizes = CPU if a.cpu else GPU
    res: dict = {"args": vars(a), "host_verdict": vf.check().components}
    kw = dict(model=a.model, trust_remote_code=True, max_model_len=a.max_model_len, max_num_seqs=256,
              max_num_batched_tokens=8192, enable_prefix_caching=True, mm_processor_cache_gb=0,
              limit_mm_per_prompt={"image": 8}, seed=0)
    if a.cpu:
        kw.update(enforce_eager=True)
    else:
        kw.update(load_format="dummy", gpu_memory_utilization=a.gpu_memory_utilization)
    log(f"starting the engine: {kw}")
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw))
    res["engine_start_s"] = round(time.perf_counter() - T0, 1)
    sampler = GpuSampler() if not a.cpu else None
    try:
        if not a.cpu:
            res["reinit"] = (await engine.collective_rpc(reinit_dummy_weights, args=(0,)))[0]
            await engine.reset_prefix_cache()
        (state,) = await engine.collective_rpc(vf.rpc_state)
        res["worker_state"] = state
        log(f"engine up in {res['engine_start_s']} s; worker: {state['active']} / {state['verdict']}")
        if not set(vf.CORE) <= set(state["active"]):
            res["errors"] = {"run": "the fast path is not active in the worker: nothing to measure"}
            log(res["errors"]["run"])
            return res

        await fastpath_probes(engine, res, sizes, cpu=a.cpu, iters=a.iters, warm=a.warm, out_dir=a.out_dir)

        # greedy ids, one prompt, both modes (a weak check: re-initialised weights repeat tokens)
        tok = AutoTokenizer.from_pretrained(a.model, trust_remote_code=True)
        PAD[0] = tok.convert_tokens_to_ids("<|media_pad|>")
        tokens = {"model": a.model, "pad": tok.convert_tokens_to_ids("<|media_pad|>"),
                  "head": tok.encode("Describe", add_special_tokens=False) + [
                      tok.convert_tokens_to_ids("<|media_start|>")],
                  "tail": [tok.convert_tokens_to_ids("<|media_end|>")] + tok.encode(" briefly.",
                                                                                     add_special_tokens=False)}
        dtype = torch.bfloat16
        greedy = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        probe_req = make_requests(1, sizes["grid"], "probe", tokens, 99, dtype)[0]
        ids = {}
        for mode, (comps, raw) in MODES.items():
            await engine.collective_rpc(vf.rpc_set_components, args=(comps,))
            out: list[int] = []
            ids_, r_, b_, h_ = probe_req
            await run_one(engine, engine_input(ids_, r_ if raw else b_, sizes["grid"], f"{h_}-{mode}", raw),
                          f"probe-{mode}", greedy, [], out)
            ids[mode] = out
        res["greedy_ids_equal"] = ids["stock"] == ids["fast"]
        log(f"greedy ids stock == fast: {res['greedy_ids_equal']} ({ids['fast'][:8]}...)")

        # 4. bursts, modes interleaved
        phases = a.phases.split(",")
        res["bursts"] = []
        # an untimed warm burst in each mode, so that neither mode's first burst pays for JIT compiles
        for mode in dict.fromkeys(phases):
            comps, raw = MODES[mode]
            await engine.collective_rpc(vf.rpc_set_components, args=(comps,))
            warm_reqs = make_requests(min(a.n, 32), sizes["grid"], f"warm-{mode}", tokens, 7, dtype, normalize=not raw)
            await burst(engine, warm_reqs, sizes["grid"], raw, greedy, f"warm-{mode}")
        log("warm bursts done")
        for i, mode in enumerate(phases):
            if time.perf_counter() - T0 > a.deadline_s:
                log(f"deadline: skipping phases from {i} ({mode})")
                break
            comps, raw = MODES[mode]
            reqs = make_requests(a.n, sizes["grid"], f"b{i}", tokens, 1000 + i, dtype, normalize=not raw)
            await engine.collective_rpc(vf.rpc_set_components, args=(comps,))
            (st0,) = await engine.collective_rpc(vf.rpc_state)
            cpu0 = children_cpu_s()
            t_start = time.perf_counter()
            dt, ttfts = await burst(engine, reqs, sizes["grid"], raw, greedy, f"burst{i}")
            del reqs
            cpu1 = children_cpu_s()
            (st,) = await engine.collective_rpc(vf.rpc_state)
            b = {"phase": i, "mode": mode, "n": a.n, "seconds": round(dt, 3), "req_s": round(a.n / dt, 2),
                 "ttft_p50_s": round(ttfts[len(ttfts) // 2], 3), "ttft_p90_s": round(ttfts[int(len(ttfts) * .9)], 3),
                 "engine_cpu_s_per_req": round((cpu1 - cpu0) / a.n, 4),
                 "gpu_util_pct": sampler.mean(t_start, t_start + dt) if sampler else None,
                 "posemb_cache": {k: st["posemb_cache"][k] - st0["posemb_cache"][k] for k in ("hits", "misses")}}
            res["bursts"].append(b)
            save(res, a.out_dir)
            log(f"burst {i} {mode:5s}: {b['req_s']:7.2f} req/s, TTFT p50 {b['ttft_p50_s']} s p90 {b['ttft_p90_s']} s, "
                f"engine CPU {b['engine_cpu_s_per_req']} s/req, GPU {b['gpu_util_pct']} %")
        per_mode = {m: [b["req_s"] for b in res["bursts"] if b["mode"] == m] for m in MODES}
        res["summary"] = {m: spread(v) for m, v in per_mode.items() if v}
        if all(per_mode.values()):
            res["summary"]["fast_over_stock"] = round(statistics.median(per_mode["fast"])
                                                      / statistics.median(per_mode["stock"]), 3)
        log(f"summary req/s: {json.dumps(res['summary'])}")
    except Exception as e:  # keep what was measured
        res.setdefault("errors", {})["run"] = repr(e)[:2000]
        log(f"run FAILED: {e!r}"[:1000])
    finally:
        if sampler:
            sampler.stop()
        engine.shutdown()
    res["total_s"] = round(time.perf_counter() - T0, 1)
    return res


def cli(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="rehearsal on the CPU engine with the tiny model, small sizes")
    ap.add_argument("--model", default=None, help="model dir (default /tmp/kimivl, or the tiny model with --cpu)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    ap.add_argument("--n", type=int, default=None, help="requests per burst (default 200; 4 with --cpu)")
    ap.add_argument("--phases", default="stock,fast,stock,fast,stock,fast")
    ap.add_argument("--iters", type=int, default=None, help="encoder timing calls per mode (default 15; 2 with --cpu)")
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.80)
    ap.add_argument("--deadline-s", type=float, default=480, help="skip bursts that would start after this")
    a = ap.parse_args(argv)
    a.model = a.model or str(ROOT / "models" / "kimi-vl-tiny" if a.cpu else "/tmp/kimivl")
    a.n = a.n or (4 if a.cpu else 200)
    a.iters = a.iters or (2 if a.cpu else 15)
    a.warm = 1 if a.cpu else a.warm
    a.max_model_len = a.max_model_len or (8192 if a.cpu else 16384)
    a.out_dir = Path(a.out)
    res = asyncio.run(main(a))
    save(res, a.out_dir)
    log(f"wrote {a.out_dir / 'vision_fastpath.json'}")
    ok = all((res.get(k) or {}).get("ok") for k in ("exactness", "cache_bounds_and_invalidation"))
    return 0 if ok and not res.get("errors") else 1


if __name__ == "__main__":
    raise SystemExit(cli())
