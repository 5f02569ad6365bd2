"""The front door as a real server: every limit is checked before the work it bounds, load past
its admission budget is queued or shed at once, abandoned requests stop costing CPU, garbage
bytes and remote servers' bytes never reach a client, and SIGTERM ends the process whatever is
running. Bounds on time and memory here are generous (CI machines are slow and shared); the
figures themselves come from bench/hardening.py.
"""
from __future__ import annotations

import http.server
import io
import socket
import threading
import time

import grpc
import psutil
import pytest
from PIL import Image

import imagedata
from conftest import ServerProcess, free_port, tiny_model_dir
from kimivl.v1 import chat_pb2, chat_pb2_grpc, preprocess_pb2, preprocess_pb2_grpc, types_pb2

SLOW_S = 4.0


class _Handler(http.server.BaseHTTPRequestHandler):
    hits = 0
    png = imagedata.sized_png(64, 48)

    def do_GET(self):  # noqa: N802
        type(self).hits += 1
        if self.path.startswith("/slow"):
            time.sleep(SLOW_S)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.png)))
        self.end_headers()
        self.wfile.write(self.png)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def bad_http_url():
    """Answers every connection with a 46 KB malformed status line."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)

    def serve():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 " + b"X\x1b[31m" * 9000 + b"\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/img.png"
    sock.close()


def _start(name, extra):
    port = free_port()
    srv = ServerProcess(name, ["preprocess", "--model", str(tiny_model_dir()), "--host", "127.0.0.1", "--port",
                               str(port), "--metrics-port", "0", "--workers", "2", "--max-images", "8",
                               "--inference-target", f"127.0.0.1:{free_port()}", *extra], port)
    srv.wait_serving(120)
    return srv


@pytest.fixture(scope="module")
def door():
    """One request prepared at a time, one more may wait up to 3 s: small enough to fill in a test."""
    http_port = free_port()
    srv = _start("preprocess-limits", ["--allow-private-urls", "--max-preparing", "1", "--max-queued", "1",
                                       "--max-queue-wait-s", "3", "--max-request-pixels", "300000000",
                                       "--http-port", str(http_port)])
    srv.http_url = f"http://127.0.0.1:{http_port}"
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def stubs(door):
    ch = grpc.insecure_channel(door.target, options=[("grpc.max_send_message_length", 64 << 20),
                                                     ("grpc.enable_retries", 0)])
    yield preprocess_pb2_grpc.PreprocessServiceStub(ch), chat_pb2_grpc.ChatServiceStub(ch), ch
    ch.close()


def _conv(*parts):
    content = [types_pb2.ContentPart(text=p) if isinstance(p, str) else types_pb2.ContentPart(image=p) for p in parts]
    return types_pb2.Conversation(messages=[types_pb2.Message(role=types_pb2.ROLE_USER, content=content)])


def _pre(conv):
    return preprocess_pb2.PreprocessRequest(conversation=conv)


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def test_a_huge_text_is_refused_before_tokenizing(door, stubs):
    pre, _, _ = stubs
    proc = psutil.Process(door.proc.pid)
    rss0, cpu0, t0 = proc.memory_info().rss, _cpu_s(proc), time.perf_counter()
    with pytest.raises(grpc.RpcError) as e:
        pre.Preprocess(_pre(_conv("lorem ipsum dolor " * 1_200_000)), timeout=60)  # 21.6 MB
    elapsed = time.perf_counter() - t0
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "21600000 characters; the limit is 65536" in e.value.details()
    # Tokenizing it would take ~50 s of CPU here and gigabytes.
    assert elapsed < 10 and _cpu_s(proc) - cpu0 < 5
    assert proc.memory_info().rss - rss0 < 400 << 20


def test_images_are_counted_before_any_is_fetched(stubs, http_url):
    pre, _, _ = stubs
    hits = _Handler.hits
    with pytest.raises(grpc.RpcError) as e:
        pre.Preprocess(_pre(_conv("x", *[types_pb2.Image(url=f"{http_url}/{i}.png") for i in range(9)])), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "9 images; the limit is 8" in e.value.details()
    assert _Handler.hits == hits


def test_pixels_per_request_are_known_from_the_headers(door, stubs):
    pre, _, _ = stubs
    proc = psutil.Process(door.proc.pid)
    cpu0 = _cpu_s(proc)
    big = types_pb2.Image(data=imagedata.png_header_only(16000, 10000))  # 160 M pixels each, under the per-image limit
    with pytest.raises(grpc.RpcError) as e:
        pre.Preprocess(_pre(_conv("x", big, big)), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "320000000 pixels in all; the limit is 300000000" in e.value.details()
    assert _cpu_s(proc) - cpu0 < 2  # decoding them would be seconds of CPU


def test_prompt_and_max_tokens_are_checked_against_the_context_before_decoding(stubs):
    _, chat, _ = stubs
    with pytest.raises(grpc.RpcError) as e:
        list(chat.Chat(chat_pb2.ChatRequest(conversation=_conv("hi"), sampling=types_pb2.SamplingParameters(
            max_tokens=8190)), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "plus sampling.max_tokens (8190) exceeds the context of 8192 tokens" in e.value.details()
    # An image's tokens count from its header: this one carries no pixels, so a decode would fail instead.
    image = types_pb2.Image(data=imagedata.png_header_only(1792, 1792))  # 4096 tokens
    with pytest.raises(grpc.RpcError) as e:
        list(chat.Chat(chat_pb2.ChatRequest(conversation=_conv("describe", image), sampling=types_pb2.SamplingParameters(
            max_tokens=5000)), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "plus sampling.max_tokens (5000)" in e.value.details(), e.value.details()


def test_load_past_the_budget_waits_in_a_bounded_queue_or_is_shed_at_once(stubs, http_url):
    pre, _, _ = stubs
    slow = _pre(_conv("slow", types_pb2.Image(url=f"{http_url}/slow.png")))
    first = pre.Preprocess.future(slow, timeout=60)  # holds the one slot for SLOW_S
    time.sleep(0.5)
    second = pre.Preprocess.future(slow, timeout=60)  # waits, up to 3 s
    time.sleep(0.3)
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as shed:
        pre.Preprocess(slow, timeout=60)  # the queue is full: refused at once
    shed_s = time.perf_counter() - t0
    assert shed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "the front door is at capacity" in shed.value.details() and "queue is full" in shed.value.details()
    assert "retry after" in shed.value.details()
    trailers = dict(shed.value.trailing_metadata())
    assert int(trailers["retry-after-ms"]) > 0 and trailers["grpc-retry-pushback-ms"] == trailers["retry-after-ms"]
    assert shed_s < 2  # no work was done for it (the figure: bench/hardening.py)
    with pytest.raises(grpc.RpcError) as waited:
        second.result()
    assert waited.value.code() == grpc.StatusCode.UNAVAILABLE and "waited 3.0 s" in waited.value.details()
    assert first.result().prompt.images  # the admitted one is served
    assert pre.Preprocess(_pre(_conv("after", types_pb2.Image(url=f"{http_url}/ok.png"))), timeout=30).prompt.images


def test_the_http_port_shares_the_budget_and_sheds_with_retry_after(door, stubs, http_url):
    """The OpenAI-compatible port runs chats through the same ChatFlow, so the same admission:
    with the slot and the queue taken by gRPC requests, an HTTP chat is a 503 at once, with
    Retry-After and OpenAI's error body."""
    import json
    import urllib.error
    import urllib.request

    pre, _, _ = stubs
    slow = _pre(_conv("slow", types_pb2.Image(url=f"{http_url}/slow.png")))
    first = pre.Preprocess.future(slow, timeout=60)  # holds the one slot for SLOW_S
    time.sleep(0.5)
    second = pre.Preprocess.future(slow, timeout=60)  # the one queue place
    time.sleep(0.3)
    body = json.dumps({"model": "kimi-vl-tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": f"{http_url}/ok.png"}}]}]}).encode()
    t0 = time.perf_counter()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(f"{door.http_url}/v1/chat/completions", data=body, headers={
            "Content-Type": "application/json"}), timeout=30)
    shed_s = time.perf_counter() - t0
    assert e.value.code == 503, e.value.read()
    assert int(e.value.headers["Retry-After"]) >= 1
    error = json.loads(e.value.read())["error"]
    assert "the front door is at capacity" in error["message"] and "queue is full" in error["message"]
    assert error["type"] == "server_error" and error["code"] == "service_unavailable"
    assert shed_s < 2
    for f in (first, second):
        try:
            f.result()
        except grpc.RpcError:
            pass  # the queued one may have waited too long: the budget's business, tested above


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_an_abandoned_request_stops_costing_cpu(door, stubs, how):
    """A 20 KB PNG declaring 13000x13000 takes seconds to decode and resize; its client leaves
    after 1.5 s and the work stops within a step."""
    pre, _, _ = stubs
    buf = io.BytesIO()
    Image.new("1", (13000, 13000)).save(buf, "PNG")
    request = _pre(_conv("big", types_pb2.Image(data=buf.getvalue())))
    proc = psutil.Process(door.proc.pid)
    if how == "cancel":
        call = pre.Preprocess.future(request, timeout=60)
        time.sleep(1.5)
        call.cancel()
    else:
        with pytest.raises(grpc.RpcError) as e:
            pre.Preprocess(request, timeout=1.5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(1.0)  # a step of work, and the token's check
    cpu0 = _cpu_s(proc)
    time.sleep(2.0)
    assert _cpu_s(proc) - cpu0 < 0.5  # the whole image would take 4+ s of CPU
    assert pre.Preprocess(_pre(_conv("still serving")), timeout=30).prompt.token_ids


@pytest.mark.parametrize("method", ["/kimivl.v1.ChatService/Chat", "/kimivl.v1.PreprocessService/Preprocess"])
def test_garbage_bytes_are_invalid_argument_without_a_traceback(door, stubs, method):
    _, _, ch = stubs
    call = (ch.unary_stream if method.endswith("Chat") else ch.unary_unary)(method)
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\x05\xff\xfe\x00\x00\x00", b"\x0a\x02\x0a\x00\x12\x03\xff\xfe\xfd"):
        with pytest.raises(grpc.RpcError) as e:
            r = call(garbage, timeout=10)
            list(r) if method.endswith("Chat") else r
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert "the request is not a valid kimivl.v1." in e.value.details()
    assert "Traceback" not in door.tail(400) and "DecodeError" not in door.tail(400)


def test_a_remote_servers_bytes_are_never_quoted(door, stubs, bad_http_url):
    pre, _, _ = stubs
    with pytest.raises(grpc.RpcError) as e:
        pre.Preprocess(_pre(_conv("x", types_pb2.Image(url=bad_http_url))), timeout=30)
    details = e.value.details()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not valid HTTP" in details and len(details) < 1024
    assert "XX" not in details and "\x1b" not in details


def test_sigterm_ends_the_process_even_with_a_thread_busy():
    """A 10 MB text with no line breaks is one uninterruptible tokenizer call (~30 s here); the
    drain's limit (1 s) still holds."""
    srv = _start("preprocess-sigterm", ["--drain-timeout-s", "1", "--max-text-chars", "100000000"])
    try:
        with grpc.insecure_channel(srv.target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            call = preprocess_pb2_grpc.PreprocessServiceStub(ch).Preprocess.future(
                _pre(_conv("word " * 2_000_000)), timeout=120)
            time.sleep(3)
            assert not call.done()
            t0 = time.monotonic()
            srv.proc.send_signal(15)
            code = srv.proc.wait(30)
            took = time.monotonic() - t0
    finally:
        srv.stop()
    assert code == 0 and took < 10, (code, took)
    assert "worker threads still busy" in srv.tail(50)
