"""`--preset auto`: the deployment guide's rows by GPU memory, and falling back one row when
the engine can't start for lack of memory (engine start replaced: no GPU here)."""
from __future__ import annotations

import argparse
import logging

import pytest

from kimivl_inference import vllm_engine as engine_mod
from kimivl_inference.options import add_arguments, pick_preset


def args(*extra):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--model", "/m", *extra])


@pytest.mark.parametrize("gb,name", [(141, "48gb"), (80, "48gb"), (48, "48gb"), (40, "32gb"), (32, "32gb"),
                                     (24, "24gb"), (16, "24gb")])
def test_rows_by_gpu_memory(gb, name):
    assert pick_preset(gb).name == name


def test_engine_args_take_the_preset_and_explicit_flags_win(monkeypatch):
    monkeypatch.setattr(engine_mod, "_gpu_memory_gb", lambda: 40.0)
    ea = engine_mod.engine_args(args("--max-num-seqs", "3"), pick_preset(40))
    assert (ea.max_num_seqs, ea.gpu_memory_utilization, ea.max_model_len) == (3, 0.90, 131072)
    assert ea.enable_prefix_caching is True and ea.mm_processor_cache_gb == 0


def test_out_of_memory_falls_back_one_row_and_says_so(monkeypatch, caplog):
    from vllm.v1.engine.async_llm import AsyncLLM

    tried = []

    def fake_start(ea):
        tried.append(ea.max_num_seqs)
        if ea.max_num_seqs == 16:
            raise ValueError("No available memory for the cache blocks. Try increasing gpu_memory_utilization")
        return "engine"

    monkeypatch.setattr(engine_mod, "_gpu_memory_gb", lambda: 80.0)
    monkeypatch.setattr(AsyncLLM, "from_engine_args", staticmethod(fake_start))
    with caplog.at_level(logging.WARNING, logger="kimivl.engine"):
        engine, preset = engine_mod.start_engine(args("--preset", "auto"))
    assert engine == "engine" and preset.name == "32gb" and tried == [16, 8]
    assert "falling back to 32gb" in caplog.text


def test_other_start_errors_are_not_retried(monkeypatch):
    from vllm.v1.engine.async_llm import AsyncLLM

    def fake_start(ea):
        raise ValueError("unknown architecture")

    monkeypatch.setattr(engine_mod, "_gpu_memory_gb", lambda: 80.0)
    monkeypatch.setattr(AsyncLLM, "from_engine_args", staticmethod(fake_start))
    with pytest.raises(ValueError, match="unknown architecture"):
        engine_mod.start_engine(args("--preset", "auto"))
