"""The serving benchmark's bookkeeping (bench/harness/), without engines: the order of units,
ratios paired repeat by repeat, the goals, CPU lists. The benchmark itself is rehearsed on the
CPU engine (bench/README.md)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from harness import schedule  # noqa: E402
from harness.placement import format_cpus, parse_cpus  # noqa: E402
from harness.report import goal_rows, markdown, ratio_rows  # noqa: E402
from harness.results import cells, paired, spread  # noqa: E402
from harness.systems import parse_systems  # noqa: E402

PHASES = [("photos", "burst"), ("photos", "poisson@24"), ("idle", "sequential")]


def test_co_resident_rounds_rotate_and_keep_late_phases_last():
    units = schedule.build(["A", "B", "C"], PHASES, repeats=3, overrides=schedule.parse_repeats_for(
        "photos/poisson@*=1,idle=2"), fresh=["A"], order="rotate", co_resident=True,
        phase_systems=schedule.parse_phase_systems("idle=A|C", ["A", "B", "C"]), late=["photos/poisson@*"])
    got = [(u["system"], u["phase"], u["repeat"]) for u in units]
    assert got[0] == ("A", "burst-fresh", 0)
    bursts = [(s, r) for s, p, r in got if p == "burst"]
    assert bursts == [("A", 0), ("B", 0), ("C", 0), ("B", 1), ("C", 1), ("A", 1), ("C", 2), ("A", 2), ("B", 2)]
    assert [(s, r) for s, p, r in got if p == "sequential"] == [("A", 0), ("C", 0), ("C", 1), ("A", 1)]
    poisson = [i for i, (_, p, _) in enumerate(got) if p.startswith("poisson")]
    assert len(poisson) == 3 and min(poisson) > max(i for i, (_, p, _) in enumerate(got) if p != "poisson@24")
    assert [u["seq"] for u in units] == list(range(1, len(units) + 1))


def test_one_at_a_time_runs_each_system_whole():
    units = schedule.build(["A", "B"], PHASES[:1], repeats=2, overrides=[], fresh=[], order="rotate",
                           co_resident=False)
    assert [(u["system"], u["repeat"]) for u in units] == [("A", 0), ("A", 1), ("B", 0), ("B", 1)]


def test_phase_systems_refuses_unknown_system():
    with pytest.raises(SystemExit, match="not in --systems"):
        schedule.parse_phase_systems("idle=A|Z", ["A", "B"])


def test_systems_parse_variants_and_refuse_duplicates():
    d = {x["name"]: x for x in parse_systems("ours,ours-stock:4,vllm:4+g,vllm:1,ceiling,ceiling-fast")}
    assert d["ours"]["variant"] == "fast" and d["ours"]["workers"] is None
    assert d["ours-stock:4"]["variant"] == "stock" and d["ours-stock:4"]["workers"] == 4
    assert d["vllm:4+g"]["graphs"] and d["vllm:4+g"]["api_servers"] == 4 and not d["vllm:1"]["graphs"]
    assert d["ceiling-fast"]["kind"] == "ceiling" and d["ceiling-fast"]["variant"] == "fast"
    with pytest.raises(SystemExit):
        parse_systems("ours,ours")
    with pytest.raises(SystemExit):
        parse_systems("vllm:4+x")


def test_cpu_lists_round_trip():
    assert parse_cpus("0-3,8,10-11") == {0, 1, 2, 3, 8, 10, 11}
    assert format_cpus({0, 1, 2, 3, 8, 10, 11}) == "0-3,8,10-11"
    assert parse_cpus("") is None
    with pytest.raises(SystemExit):
        parse_cpus("5-3")


def _results(values: dict) -> dict:
    """{(system, kind, variant): {(inv, repeat, phase): req_per_s}} -> a results document."""
    runs = []
    for (name, kind, variant), cells_ in values.items():
        for inv in sorted({k[0] for k in cells_}):
            phases = [{"workload": "photos", "phase": p, "pattern": "burst", "n": 300, "repeat": r,
                       "spec": {"mp": "1,1"}, "placement": "front door 0-3",
                       "summary": {"req_per_s": v, "ttft_p50_s": 10.0 / v, "ok": 300, "errors": 0}}
                      for (i, r, p), v in cells_.items() if i == inv]
            runs.append({"system": name, "kind": kind, "variant": variant, "invocation": inv, "phases": phases})
    return {"invocations": [{"cmd": "x", "started": "t", "mode": "gpu", "versions": {}, "engine": {}},
                            {"cmd": "y", "started": "t", "mode": "gpu", "versions": {}, "engine": {}}],
            "runs": runs}


def test_ratios_pair_repeats_of_one_invocation_and_goals_use_the_faster_vllm_variant():
    res = _results({
        ("ours", "ours", "fast"): {(0, 0, "burst"): 30.0, (0, 1, "burst"): 33.0, (1, 0, "burst"): 27.0,
                                   (0, 0, "burst-fresh"): 29.0},
        ("ceiling", "ceiling", "stock"): {(0, 0, "burst"): 20.0, (0, 1, "burst"): 22.0, (1, 0, "burst"): 18.0},
        ("vllm:4", "vllm", "stock"): {(1, 0, "burst"): 15.0},
        ("vllm:4+g", "vllm", "g"): {(1, 0, "burst"): 16.0},
    })
    cs = cells(res)
    assert [round(x, 3) for _, _, x in paired(cs, "ours", "ceiling", "photos", "burst", "req_per_s")] == [
        1.5, 1.5, 1.5]
    assert paired(cs, "ours", "vllm:4", "photos", "burst", "req_per_s") == [(1, 0, 27.0 / 15.0)]
    rows = {r[0]: r for r in goal_rows(res)}
    fast = rows["ours (fast path) ÷ stock ceiling, photo burst, req/s"]
    assert fast[3] == "1.50 [1.50–1.50] (1.50, 1.50, 1.50)" and fast[5] == "**yes**" and fast[6] == "3"
    v4 = rows["ours (fast path) ÷ vllm serve, 4 API servers, photo burst, req/s"]
    assert "vllm:4+g" in v4[1] and v4[3] == f"{27 / 16:.2f}"
    fresh = rows["fresh tier's first burst ÷ its steady bursts (ours, fast path), req/s"]
    assert fresh[3] == f"{29 / 31.5:.2f}" and fresh[5] == "no"
    assert any(r[1] == "ours ÷ ceiling" for r in ratio_rows(res))
    md = markdown(res)
    assert "## Goals" in md and "front door 0-3" in md


def test_spread_reads_median_range_and_values():
    assert spread([1.2, 1.0, 1.1]) == "1.10 [1.00–1.20] (1.20, 1.00, 1.10)"
    assert spread([None, 2.0]) == "2.00"
    assert spread([]) == "-"
