"""Prefill grouping (kimivl_inference.admission): who waits, for how long, and who goes together.

Domain logic on a real event loop; the inference tier with a window on, with the real engine,
is in test_prefill_window.py."""
from __future__ import annotations

import argparse
import asyncio
import time

import pytest

from kimivl_inference.admission import PrefillGrouper
from kimivl_inference.options import add_arguments


async def _admit_at(grouper, delay_s, tokens, busy=True):
    await asyncio.sleep(delay_s)
    t = time.perf_counter()
    held = await grouper.admit(tokens, engine_busy=busy)
    return t, time.perf_counter(), held


async def test_off_and_idle_engine_never_hold():
    assert await PrefillGrouper(0.0, 8192).admit(100, engine_busy=True) == 0.0
    assert await PrefillGrouper(0.5, 8192).admit(100, engine_busy=False) == 0.0


async def test_requests_within_the_window_go_together_when_it_closes():
    g = PrefillGrouper(0.2, 8192)
    r = await asyncio.gather(_admit_at(g, 0.0, 100), _admit_at(g, 0.05, 100), _admit_at(g, 0.1, 100))
    releases = [end for _, end, _ in r]
    assert max(releases) - min(releases) < 0.02  # one release for the group
    assert 0.18 < releases[0] - r[0][0] < 0.6  # the first waited the window (not less; a loaded CI may add)
    assert r[2][2] < r[0][2]  # the last to join waited least
    # the next request after the release opens a new window
    start, end, held = await _admit_at(g, 0.0, 100)
    assert held > 0.15


async def test_a_group_that_fills_one_engine_step_goes_at_once():
    g = PrefillGrouper(5.0, 1000)
    t0 = time.perf_counter()
    await asyncio.gather(_admit_at(g, 0.0, 600), _admit_at(g, 0.02, 600))
    assert time.perf_counter() - t0 < 1.0  # not the 5 s window


async def test_a_cancelled_member_does_not_hold_back_the_others():
    g = PrefillGrouper(0.15, 8192)
    first = asyncio.ensure_future(_admit_at(g, 0.0, 100))
    second = asyncio.ensure_future(_admit_at(g, 0.02, 100))
    await asyncio.sleep(0.05)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    _, _, held = await asyncio.wait_for(second, 1.0)
    assert 0.08 < held < 0.5


def test_the_window_option_refuses_what_would_hang_or_silently_disable_it(capsys):
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--model", "m"]).prefill_window_ms == 0
    assert p.parse_args(["--model", "m", "--prefill-window-ms", "20"]).prefill_window_ms == 20
    for bad in ("-1", "nan", "inf", "5000"):
        with pytest.raises(SystemExit):
            p.parse_args(["--model", "m", "--prefill-window-ms", bad])
        assert "--prefill-window-ms: must be between 0 and 1000 ms" in capsys.readouterr().err
