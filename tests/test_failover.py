"""Failover on loopback, through the same resolver path a headless Service gives in a
cluster: one front door, two inference tiers (real CPU engines) at 127.0.0.1:P and
127.0.0.2:P, and a DNS server on loopback that answers the name with both addresses
(as cluster DNS answers a headless Service with one A record per ready pod)."""
from __future__ import annotations

import io
import os
import re
import signal
import socketserver
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from dnslib import QTYPE, RR, A, DNSRecord
from PIL import Image
from skimage import data as skdata

from conftest import ServerProcess, free_port, start_preprocess, tiny_model_dir
from kimivl.client import Client, KimiVLError, Unavailable

pytestmark = pytest.mark.engine
NAME = "kimivl-inference.test."
ADDRESSES = ["127.0.0.1", "127.0.0.2"]


class _DNSHandler(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        q = DNSRecord.parse(data)
        reply = q.reply()
        if str(q.q.qname) == NAME and q.q.qtype == QTYPE.A:
            for ip in ADDRESSES:
                reply.add_answer(RR(NAME, QTYPE.A, rdata=A(ip), ttl=1))
        sock.sendto(reply.pack(), self.client_address)


@pytest.fixture(scope="module")
def dns_server():
    srv = socketserver.ThreadingUDPServer(("127.0.0.1", 0), _DNSHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()


def _start(host: str, port: int) -> ServerProcess:
    return ServerProcess(f"inference-{host}", [
        "inference", "--model", str(tiny_model_dir()), "--host", host, "--port", str(port),
        "--metrics-port", str(free_port()), "--device", "cpu", "--enforce-eager", "--max-model-len", "4096",
        "--limit-mm-per-prompt", "8", "--drain-timeout-s", "5"], port)


def _requests_served(srv: ServerProcess) -> float:
    port = srv.args[srv.args.index("--metrics-port") + 1]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(r"^kimivl_time_to_first_token_seconds_count (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(skdata.coffee()).save(buf, format="JPEG")
    return buf.getvalue()


def test_spread_failover_and_recovery(dns_server):
    port = free_port()
    a, b = _start(ADDRESSES[0], port), _start(ADDRESSES[1], port)
    front = None
    try:
        a.wait_serving(300)
        b.wait_serving(300)
        front = start_preprocess(f"dns://127.0.0.1:{dns_server}/{NAME.rstrip('.')}:{port}")
        front.wait_serving(60)
        image = _jpeg()
        short = {"temperature": 0.0, "max_tokens": 4}

        # 1. Requests spread across both inference tiers (round_robin picks among the READY
        # subchannels: on a busy machine the second may connect a few requests later).
        with Client(front.target, timeout_s=120) as c:
            for sent in range(1, 31):
                c.chat(["Hello", image], sampling=short)
                if sent >= 6 and _requests_served(a) >= 1 and _requests_served(b) >= 1:
                    break
        assert _requests_served(a) >= 1 and _requests_served(b) >= 1, (_requests_served(a), _requests_served(b))

        # 2. Kill one mid-stream: its streams end promptly with UNAVAILABLE, the others finish.
        def long_stream(i):
            try:
                with Client(front.target, timeout_s=300) as c:
                    r = c.chat([f"Stream {i}", image], sampling={"temperature": 0.0, "max_tokens": 200,
                                                                 "ignore_eos": True})
                return "done", len(r.token_ids), time.monotonic()
            except KimiVLError as e:
                return e.code.name, e.details, time.monotonic()

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(long_stream, i) for i in range(4)]
            time.sleep(6)  # all four are generating, spread over both tiers
            killed_at = time.monotonic()
            # A pod dies whole: the server and vLLM's engine processes with it.
            victims = [a.proc.pid, *(c.pid for c in psutil.Process(a.proc.pid).children(recursive=True))]
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            outcomes = [f.result(timeout=300) for f in futures]
        done = [o for o in outcomes if o[0] == "done"]
        failed = [o for o in outcomes if o[0] != "done"]
        assert all(o[1] == 200 for o in done), outcomes
        assert failed, f"no stream was on the killed tier: {outcomes}"
        for code, _details, ended_at in failed:
            assert code == "UNAVAILABLE", outcomes
            assert ended_at - killed_at < 15, outcomes  # ended promptly, no hang
        assert len(done) + len(failed) == 4  # none lost silently

        # 3. New requests go to the survivor.
        before = _requests_served(b)
        with Client(front.target, timeout_s=120) as c:
            for _ in range(4):
                assert len(c.chat(["After", image], sampling=short).token_ids) == 4
        assert _requests_served(b) - before == 4

        # 4. Restarted, it gets traffic again once its health is SERVING.
        a.start()
        a.wait_serving(300)
        deadline = time.monotonic() + 60
        with Client(front.target, timeout_s=120) as c:
            while _requests_served(a) == 0 and time.monotonic() < deadline:
                try:
                    c.chat(["Back?", image], sampling=short)
                except Unavailable:
                    pass
        assert _requests_served(a) >= 1
    finally:
        if front:
            front.stop()
        a.stop(timeout_s=30)
        b.stop(timeout_s=30)
