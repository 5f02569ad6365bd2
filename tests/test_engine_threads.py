"""The engine's processes on a GPU start with one torch intra-op thread (``--engine-torch-threads``):
the environment a spawned engine core reads, real child processes, and the tier's decisions
(engine start replaced where a GPU would be needed)."""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os

import pytest

from kimivl_inference import vllm_engine as engine_mod
from kimivl_inference.engine_threads import OMP, START_METHOD, engine_threads
from kimivl_inference.options import add_arguments


def args(*extra):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--model", "/m", *extra])


def _report(q):
    import torch

    q.put(torch.get_num_threads())


def _spawned_threads() -> int:
    """torch's intra-op threads in a freshly spawned process, as vLLM starts its engine core."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_report, args=(q,))
    p.start()
    try:
        return q.get(timeout=120)
    finally:
        p.join(30)


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(OMP, raising=False)
    monkeypatch.delenv(START_METHOD, raising=False)


def test_a_process_spawned_while_the_engine_starts_has_one_thread(clean_env):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs: with one, torch's default is one thread too")
    assert _spawned_threads() == len(os.sched_getaffinity(0))  # torch's default: a thread per CPU
    with engine_threads(1, on_gpu=True) as what:
        assert _spawned_threads() == 1
        assert os.environ[START_METHOD] == "spawn"
    assert "1 (OMP_NUM_THREADS" in what
    assert OMP not in os.environ  # this process's environment as it was
    with engine_threads(0, on_gpu=True) as what:
        assert _spawned_threads() == len(os.sched_getaffinity(0))
    assert "torch's default" in what


def test_the_environment_and_the_cpu_backend_win(clean_env, monkeypatch):
    with engine_threads(1, on_gpu=False) as what:
        assert OMP not in os.environ and START_METHOD not in os.environ
    assert "CPU backend" in what
    monkeypatch.setenv(OMP, "6")
    with engine_threads(1, on_gpu=True) as what:
        assert os.environ[OMP] == "6"
    assert what == "OMP_NUM_THREADS=6 from the environment" and os.environ[OMP] == "6"


def test_start_engine_starts_the_engine_with_it(clean_env, monkeypatch):
    from vllm.v1.engine.async_llm import AsyncLLM

    seen = []
    monkeypatch.setattr(AsyncLLM, "from_engine_args", staticmethod(lambda ea: seen.append(os.environ.get(OMP))))
    monkeypatch.setattr(engine_mod, "_gpu_memory_gb", lambda: 141.0)
    engine_mod.start_engine(args("--preset", "none"))
    engine_mod.start_engine(args("--preset", "none", "--engine-torch-threads", "3"))
    engine_mod.start_engine(args("--preset", "none", "--engine-torch-threads", "0"))
    engine_mod.start_engine(args("--preset", "none", "--device", "cpu"))
    monkeypatch.setattr(engine_mod, "_gpu_memory_gb", lambda: None)
    engine_mod.start_engine(args("--preset", "none"))
    assert seen == ["1", "3", None, None, None]
    assert OMP not in os.environ


def test_the_flag_refuses_negative_counts():
    assert args().engine_torch_threads == 1
    with pytest.raises(SystemExit):
        args("--engine-torch-threads", "-1")
