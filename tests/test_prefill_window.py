"""The inference tier with --prefill-window-ms on: real tiers, real vLLM (CPU engine).

Requests that arrive while the engine is busy are held and handed over together, and still
get their full answers; an idle engine takes a request at once. (Their greedy ids need not
equal those of the same requests run alone: prefilled in one batch, bf16 sums round
differently, and the random model's logits are near ties.)"""
from __future__ import annotations

import concurrent.futures
import re
import urllib.request

import pytest

from conftest import start_inference, start_preprocess
from imagedata import photo_jpeg
from kimivl.client import Client

pytestmark = pytest.mark.engine

WINDOW_MS = 400
GREEDY = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def tiers(tiny_model):
    inference = start_inference(extra=["--no-prefix-caching", "--prefill-window-ms", str(WINDOW_MS)])
    front = None
    try:
        inference.wait_serving()
        front = start_preprocess(inference.target)
        front.wait_serving(60)
        yield inference, front
    finally:
        if front:
            front.stop()
        inference.stop()


def _hold(inference) -> tuple[float, float]:
    port = inference.args[inference.args.index("--metrics-port") + 1]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    value = {name: float(re.search(rf"^kimivl_prefill_hold_seconds_{name} (\S+)$", text, re.M).group(1))
             for name in ("count", "sum")}
    return value["count"], value["sum"]


def test_held_while_busy_not_when_idle_and_results_unchanged(tiers):
    inference, front = tiers
    questions = [["What is this?", photo_jpeg("coffee")], ["And this?", photo_jpeg("chelsea")]]
    with Client(front.target, timeout_s=300) as c:
        count0, sum0 = _hold(inference)
        for q in questions:  # one at a time: the engine is idle when each arrives
            assert len(c.chat(q, sampling=GREEDY).token_ids) == GREEDY["max_tokens"]
        count1, sum1 = _hold(inference)
        assert count1 - count0 == 2 and sum1 - sum0 < 0.05, "an idle engine must not hold"

        # A long generation keeps the engine busy while the two questions arrive together.
        long = c.stream(["Describe at length", photo_jpeg("astronaut")],
                        sampling={"temperature": 0.0, "max_tokens": 3000, "ignore_eos": True})
        next(iter(long))  # its first token is out: the engine is busy now, for seconds (closed below)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda q: c.chat(q, sampling=GREEDY), questions))
        long.close()
    count2, sum2 = _hold(inference)
    assert count2 - count1 == 3  # the long one (engine idle: not held) and the two
    held = sum2 - sum1
    assert 0.2 < held < 2 * WINDOW_MS / 1e3 + 0.5, held  # both held, for about one window, not more
    assert [len(r.token_ids) for r in together] == [GREEDY["max_tokens"]] * 2
    assert all(r.finish_reason == "length" for r in together)

