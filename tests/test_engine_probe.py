"""bench/engine_probe: it patches vLLM's engine core only where asked, describes what the core
receives, and its report sets units side by side from the probe's files and results.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

PROBE = ROOT / "bench" / "engine_probe"
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(PROBE))

import engine_probe_report as report  # noqa: E402
import kimivl_engine_probe as probe  # noqa: E402


def test_it_patches_the_engine_core_only_when_asked(tmp_path):
    code = ("import vllm.v1.engine.core as c, vllm.v1.core.sched.scheduler as s; "
            "print(c.EngineCore.preprocess_add_request.__qualname__, c.EngineCore.step.__qualname__, "
            "s.Scheduler.schedule.__qualname__)")
    env = {**os.environ, "PYTHONPATH": str(PROBE)}
    env.pop("KIMIVL_ENGINE_PROBE_DIR", None)
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    on = subprocess.run([sys.executable, "-c", code], env={**env, "KIMIVL_ENGINE_PROBE_DIR": str(tmp_path)},
                        capture_output=True, text=True, timeout=600)
    assert off.returncode == 0 and on.returncode == 0, off.stderr[-2000:] + on.stderr[-2000:]
    assert off.stdout.split() == ["EngineCore.preprocess_add_request", "EngineCore.step", "Scheduler.schedule"]
    assert on.stdout.split() == ["_patch_core.<locals>.preprocess_add_request", "_patch_core.<locals>.step",
                                 "_patch_scheduler.<locals>.schedule"]


def test_a_request_is_described_without_its_data():
    import torch
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine import EngineCoreRequest

    req = EngineCoreRequest(request_id="r1", prompt_token_ids=list(range(100)), mm_features=None,
                            sampling_params=SamplingParams(temperature=0.0, max_tokens=4,
                                                           output_kind=RequestOutputKind.DELTA),
                            pooling_params=None, arrival_time=1.0, lora_request=None, cache_salt=None,
                            data_parallel_rank=None, prompt_embeds=torch.zeros(3, 4, dtype=torch.bfloat16))
    d = probe.summarize(req)
    assert d["__type__"] == "EngineCoreRequest" and d["prompt_token_ids"] == {"list": 100, "ints": True}
    assert d["prompt_embeds"] == {"tensor": "bfloat16", "shape": [3, 4], "device": "cpu", "contiguous": True,
                                  "pinned": False}
    assert d["sampling_params"]["output_kind"]["_name_"] == "DELTA" and d["sampling_params"]["max_tokens"] == 4
    masked = report.mask(d)
    assert masked["request_id"] == "*" and masked["arrival_time"] == "*" and masked["sampling_params"]["n"] == 1


def test_the_report_finds_each_units_requests_steps_and_threads(tmp_path):
    t0 = 1000.0
    results = {"invocations": [{"clock_t0_perf_counter_s": t0}], "runs": [{
        "system": "ours", "info": {"cpus_in_force": {"inference tier": {"python[10]": "1", "VLLM::EngineCore[11]": "1"}}},
        "phases": [{"workload": "photos", "phase": "burst", "repeat": 0, "n": 2,
                    "summary": {"window_s": [10.0, 20.0], "req_per_s": 0.2, "engine_core_cpu_s_per_req": 0.5}}]}]}
    lines = [
        {"kind": "proc", "pid": 11, "torch_threads": 1},
        {"kind": "threads", "t": t0 + 9, "procs": {"11": {"comm": "VLLM::EngineCor", "threads": [
            [11, "MainThread", 1.0, 0.0], [12, "native:VLLM::EngineCor", 0.0, 0.0]]}}},
        {"kind": "req", "t": t0 + 10.5, "pre_cpu_s": 0.001, "req": {"request_id": "a", "x": 1}},
        {"kind": "req", "t": t0 + 11.5, "pre_cpu_s": 0.003, "req": {"request_id": "b", "x": 1}},
        {"kind": "step", "t": t0 + 12, "wall_s": 1.0, "cpu_s": 0.2, "executed": True, "n_sched": 2, "prefill_reqs": 2,
         "prefill_tokens": 300, "enc_inputs": 2, "sched_cpu_s": 0.001},
        {"kind": "step", "t": t0 + 13, "wall_s": 1.0, "cpu_s": 0.1, "executed": True, "n_sched": 2, "prefill_reqs": 0,
         "prefill_tokens": 0, "enc_inputs": 0, "sched_cpu_s": 0.001},
        {"kind": "step", "t": t0 + 25, "wall_s": 1.0, "cpu_s": 9.0, "executed": True, "n_sched": 1},  # after the unit
        {"kind": "threads", "t": t0 + 21, "procs": {"11": {"comm": "VLLM::EngineCor", "threads": [
            [11, "MainThread", 1.4, 0.2], [12, "native:VLLM::EngineCor", 3.0, 0.0]]}}},
    ]
    (tmp_path / "11.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rows, reqs = report.unit_rows(results, report.load_probe(str(tmp_path)), "photos/burst")
    (r,) = rows
    assert (r["reqs_seen"], r["steps"], r["prefill_steps"], r["prefills_per_prefill_step"]) == (2, 2, 1, 2)
    assert abs(r["arrive_max_s"] - 1.5) < 1e-9 and abs(r["main_cpu_s_per_req"] - 0.15) < 1e-9
    assert abs(r["input_cpu_ms_per_req"] - 2.0) < 1e-9
    assert {k: round(v, 6) for k, v in r["threads"].items()} == {"VLLM::EngineCor · native:VLLM::EngineCor": 1.5,
                                                               "VLLM::EngineCor · MainThread": 0.3}
    assert "2 requests, 1 distinct shape(s)" in report.report(rows, reqs)
