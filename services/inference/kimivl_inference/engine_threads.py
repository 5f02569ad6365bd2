"""torch's intra-op threads in the engine processes the tier starts on a GPU.

With one GPU, vLLM's engine core runs the model runner too, and each step does a few large CPU
tensor operations (batching the step's multimodal items into pinned memory, pinned copies). Above
torch's grain size each fans out over its intra-op pool, whose OpenMP workers then spin-wait after
the parallel region (libgomp: tens of ms, ``bench/omp_spin.py``): cores burnt beside the engine
loop's serial code, and a container's CPU quota. torch sizes the pool by the process's CPU set
(a node's every core in a pod). vLLM 0.26 leaves the engine core so; from 0.32 vLLM itself sets one
thread for serving (vllm-project/vllm#49919), respecting an ``OMP_NUM_THREADS`` set from outside.

The tier starts its engine with ``OMP_NUM_THREADS=N`` (``--engine-torch-threads``, default 1) in
the environment the engine core is spawned with; torch reads it when it loads there. vLLM spawns
(rather than forks) its engine core once CUDA is initialised, which the tier has done by then
(it reads the GPU's memory); ``VLLM_WORKER_MULTIPROC_METHOD=spawn`` (unless set) makes that
explicit, since a forked core would keep the tier's own thread count. The tier's process keeps its own threads
(torch read its environment long before; ``--torch-threads`` sets them). Not on the CPU backend,
whose worker computes the model on its threads.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

OMP = "OMP_NUM_THREADS"
START_METHOD = "VLLM_WORKER_MULTIPROC_METHOD"


@contextlib.contextmanager
def engine_threads(n: int, on_gpu: bool) -> Iterator[str]:
    """While the engine starts: its processes' environment asks for ``n`` intra-op threads.
    Yields what was decided, for the log; restores this process's environment after."""
    if not on_gpu:
        yield "torch's default (the CPU backend sets its own)"
        return
    if n <= 0:
        yield "torch's default, a thread per CPU of the process (--engine-torch-threads 0)"
        return
    if OMP in os.environ:
        yield f"{OMP}={os.environ[OMP]} from the environment"
        return
    # spawn, as vLLM itself switches to once CUDA is initialised (and says so in its log): only a
    # spawned core reads this environment; it stays set, as vLLM leaves it
    os.environ.setdefault(START_METHOD, "spawn")
    os.environ[OMP] = str(n)
    try:
        yield f"{n} ({OMP} for the engine processes)"
    finally:
        os.environ.pop(OMP, None)
