"""The inference tier's lifecycle as an orchestrator sees it: health while starting,
draining on SIGTERM, and exiting non-zero when the engine dies."""
from __future__ import annotations

import io
import re
import threading
import time
import urllib.request

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2
from PIL import Image
from skimage import data as skdata

from conftest import start_inference, start_preprocess
from kimivl.client import Client, Unavailable

pytestmark = pytest.mark.engine
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _jpeg():
    buf = io.BytesIO()
    Image.fromarray(skdata.coffee()).save(buf, format="JPEG")
    return buf.getvalue()


LONG_TOKENS = 400  # seconds of generation on any CPU, well inside the drain limit

@pytest.fixture
def own_tiers(tiny_model):
    # --torch-threads: not torch's default on CI's 2 cores; the drain outlasts the long stream
    inf = start_inference(extra=["--torch-threads", "3", "--drain-timeout-s", "240"])
    pre = None
    try:
        # The port answers at once, NOT_SERVING until the engine is ready.
        deadline = time.monotonic() + 60
        while inf.health() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert inf.health() == NOT_SERVING
        assert inf.health("kimivl.v1.InferenceService") == NOT_SERVING
        inf.wait_serving()
        pre = start_preprocess(inf.target)
        pre.wait_serving(60)
        yield inf, pre
    finally:
        if pre:
            pre.stop()
        inf.stop(timeout_s=30)


def test_sigterm_drains_in_flight_streams_and_refuses_new_ones(own_tiers):
    inf, pre = own_tiers
    image = _jpeg()
    outcome = {}

    streaming = threading.Event()

    def long_stream():
        # SIGTERM is sent once tokens are arriving, so the stream is surely in flight (a tiny
        # model on a fast CPU finishes 60 tokens in about a second).
        collected = []
        with Client(pre.target, timeout_s=300) as c:
            for ev in c.stream(["Keep going", image], sampling={"temperature": 0.0, "max_tokens": LONG_TOKENS,
                                                                 "ignore_eos": True}):
                collected.extend(ev.token_ids)
                if collected and not streaming.is_set():
                    streaming.set()
                if ev.result is not None:
                    outcome["result"] = ev.result
        outcome["token_ids"] = collected

    # Prefix caching is asked for by default: a repeated prompt is served from the cache. vLLM
    # turns it off for MLA models on CPUs without AMX; the tier reports which it got.
    metrics_port = int(inf.args[inf.args.index("--metrics-port") + 1])
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    prefix_caching = re.search(r"^kimivl_engine_prefix_caching (\S+)$", text, re.M)
    assert prefix_caching is not None
    # The start-up line says the same, and that --torch-threads took (the engine core keeps its own).
    ready = re.search(r"engine ready in .*prefix caching (on|off), torch threads here (\d+)[,)]", inf.tail(400))
    assert ready is not None, inf.tail(40)
    assert ready.group(1) == ("on" if float(prefix_caching.group(1)) == 1 else "off")
    assert ready.group(2) == "3"
    with Client(pre.target, timeout_s=120) as c:
        c.chat(["Cache me", image], sampling={"max_tokens": 2})
        again = c.chat(["Cache me", image], sampling={"max_tokens": 2})
    if float(prefix_caching.group(1)) == 1:
        assert again.usage.cached_prompt_tokens > 0
    else:
        assert again.usage.cached_prompt_tokens == 0

    t = threading.Thread(target=long_stream)
    t.start()
    assert streaming.wait(120), "no token arrived"
    inf.proc.send_signal(__import__("signal").SIGTERM)
    deadline = time.monotonic() + 10
    while inf.health() == SERVING and time.monotonic() < deadline:
        time.sleep(0.1)
    # Draining keeps the port open and says so: probes see NOT_SERVING, not a refused connection.
    assert inf.health() == NOT_SERVING and inf.health("kimivl.v1.InferenceService") == NOT_SERVING, inf.tail(40)
    with Client(pre.target, timeout_s=30) as c, pytest.raises(Unavailable):
        c.chat(["New request", image], sampling={"max_tokens": 4})
    t.join(300)
    assert re.search(r"draining: refusing new RPCs, up to \d+ s for the 1 in flight", inf.tail(400)), inf.tail(40)
    assert len(outcome["token_ids"]) == LONG_TOKENS  # the in-flight stream finished
    assert inf.proc.wait(60) == 0


def test_engine_death_turns_health_off_and_exits_non_zero(own_tiers):
    inf, pre = own_tiers
    children = psutil.Process(inf.proc.pid).children(recursive=True)
    assert children, "the engine core runs in a child process"
    for ch in children:
        ch.kill()
    assert inf.proc.wait(60) != 0
    with Client(pre.target, timeout_s=30) as c, pytest.raises(Unavailable, match="inference tier unavailable"):
        c.chat(["Anyone?"], sampling={"max_tokens": 4})
    assert pre.health() == SERVING  # the front door itself stays up
    with grpc.insecure_channel(inf.target) as ch:
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(ch).result(timeout=1)
