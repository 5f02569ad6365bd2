"""What torch's intra-op threads cost a process that mostly waits: the engine core's pattern.

vLLM's engine core (one GPU: the model runner too) runs a few large CPU tensor ops per step —
batching a step's multimodal items into one (pinned) buffer, ``pin_memory()`` copies — and
otherwise waits on the GPU. With T intra-op threads each such op wakes T-1 OpenMP workers, which
spin-wait after the parallel region (libgomp's default: GOMP_SPINCOUNT 300,000 pause loops)
before they sleep. This measures it without a GPU: per "step", concatenate K uint8 tensors of
``--mb`` MB into a preallocated buffer (as ``MultiModalFlatField._reduce_data`` does; ``--op vllm``:
batch K real multimodal items, 1 MP photos' raw patches in the inference tier's field layout,
through vLLM's own ``group_and_batch_mm_kwargs``, as the model runner does each step), then block
for ``--wait-ms`` (as the engine core blocks on the GPU). Each thread count runs in a fresh
spawned process (libgomp sizes its team at load), modes interleaved, repeats reported.

Printed per thread count: the process's CPU-seconds per step (all threads, from /proc), the
calling thread's alone, and the copy's wall time: CPU beyond the caller's is the workers'.

``--start-methods`` shows where an engine core's thread count comes from: run pinned to fewer CPUs
(``taskset -c 0 python bench/omp_spin.py --start-methods``), this process loads torch, widens its
own CPU set to every CPU (as the benchmark does before AsyncLLM starts the ceiling's engine core)
and starts a child by fork and one by spawn: a forked child keeps the thread count torch took
from the CPU set at its load in the parent; a spawned one takes its own CPU set's.

usage: python bench/omp_spin.py [--threads 1,2] [--steps 200] [--repeats 3] [--mb 3] [--k 6]
       taskset -c 0 python bench/omp_spin.py --start-methods
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics as st
import time


def _proc_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _mm_items(k: int) -> list:
    """k 1 MP photos (58x88 patches) as the inference tier hands them to vLLM: raw uint8 patches
    under the fast path's key, grid kept on the CPU (kimivl_inference.engine_input's layout)."""
    import torch
    from transformers import BatchFeature
    from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems

    out = []
    for _ in range(k):
        grid = torch.tensor([[58, 88]])
        x = torch.randint(0, 255, (58 * 88, 3, 14, 14), dtype=torch.uint8)
        items = MultiModalKwargsItems.from_hf_inputs(BatchFeature({"kimivl_pixel_bytes": x, "image_grid_hws": grid}), {
            "kimivl_pixel_bytes": MultiModalFieldConfig.flat_from_sizes("image", grid.prod(-1)),
            "image_grid_hws": MultiModalFieldConfig.batched("image", keep_on_cpu=True)})
        out.append(("image", items["image"][0]))
    return out


def _run(threads: int, steps: int, mb: float, k: int, wait_ms: float, op: str, q) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    if op == "vllm":
        items = _mm_items(k)
        from vllm.multimodal.utils import group_and_batch_mm_kwargs

        def step():
            for _ in group_and_batch_mm_kwargs(items, device="cpu"):
                pass
    else:
        parts = [torch.randint(0, 255, (int(mb * 2**20),), dtype=torch.uint8) for _ in range(k)]
        out = torch.empty(sum(p.numel() for p in parts), dtype=torch.uint8)

        def step():
            torch.cat(parts, out=out)
    step()  # the team exists before timing
    time.sleep(0.2)
    c0, m0 = _proc_cpu(), time.thread_time()
    copy = 0.0
    for _ in range(steps):
        t = time.perf_counter()
        step()
        copy += time.perf_counter() - t
        time.sleep(wait_ms / 1e3)
    q.put({"threads": threads, "cpu_ms_per_step": 1e3 * (_proc_cpu() - c0) / steps,
           "caller_cpu_ms_per_step": 1e3 * (time.thread_time() - m0) / steps, "copy_ms": 1e3 * copy / steps,
           "tasks": len(os.listdir(f"/proc/{os.getpid()}/task"))})


def _child(q) -> None:
    import torch

    x = torch.zeros(8 << 20, dtype=torch.uint8)
    torch.cat([x, x])  # a parallel region: the team is made now
    q.put({"affinity": sorted(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
           "threads_in_process": len(os.listdir(f"/proc/{os.getpid()}/task"))})


def start_methods() -> None:
    import torch

    pinned = sorted(os.sched_getaffinity(0))
    print(f"this process: CPUs {pinned} when torch loaded, torch threads {torch.get_num_threads()}")
    os.sched_setaffinity(0, range(os.cpu_count()))
    for method in ("fork", "spawn"):
        ctx = mp.get_context(method)
        q = ctx.Queue()
        pr = ctx.Process(target=_child, args=(q,))
        pr.start()
        r = q.get()
        pr.join()
        print(f"{method:5s} child: CPUs {r['affinity']}, torch threads {r['torch_threads']}, "
              f"threads in process {r['threads_in_process']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mb", type=float, default=3.0, help="MB per item (a 1 MP photo's uint8 patches: ~3)")
    p.add_argument("--k", type=int, default=6, help="items per step (8192 tokens / 1331: 6 photos)")
    p.add_argument("--wait-ms", type=float, default=20.0)
    p.add_argument("--op", choices=["cat", "vllm"], default="cat",
                   help="cat: torch.cat into a buffer; vllm: vLLM's group_and_batch_mm_kwargs over real items")
    p.add_argument("--start-methods", action="store_true", help="only show fork vs spawn thread counts")
    a = p.parse_args()
    if a.start_methods:
        return start_methods()
    ctx = mp.get_context("spawn")
    rows: dict[int, list[dict]] = {}
    for _ in range(a.repeats):
        for t in (int(x) for x in a.threads.split(",")):
            q = ctx.Queue()
            pr = ctx.Process(target=_run, args=(t, a.steps, a.mb, a.k, a.wait_ms, a.op, q))
            pr.start()
            rows.setdefault(t, []).append(q.get())
            pr.join()
    what = (f"{a.k} 1 MP photos' items batched by vLLM" if a.op == "vllm" else
            f"{a.k} x {a.mb:g} MB uint8 concatenated")
    print(f"{what} per step, then {a.wait_ms:g} ms blocked; {a.steps} steps; "
          f"median [min-max] of {a.repeats} interleaved repeats; CPUs here: {sorted(os.sched_getaffinity(0))}\n")
    print("| torch threads | process CPU ms / step | calling thread CPU ms / step | other threads ms / step | "
          "copy wall ms | threads in process |")
    print("|---:|---|---|---|---|---:|")

    def f(xs):
        return f"{st.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"

    for t, rs in rows.items():
        cpu = [r["cpu_ms_per_step"] for r in rs]
        caller = [r["caller_cpu_ms_per_step"] for r in rs]
        other = [c - m for c, m in zip(cpu, caller, strict=True)]
        print(f"| {t} | {f(cpu)} | {f(caller)} | {f(other)} | {f([r['copy_ms'] for r in rs])} | {rs[0]['tasks']} |")


if __name__ == "__main__":
    main()
