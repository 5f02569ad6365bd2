"""The front door's upload gate against a real gRPC server on loopback: a slot frees when the
server's headers arrive (not at the first message), after max_wait_s when they don't, in
arrival order, and a caller that leaves cancels its call."""
import argparse
import asyncio
import time

import grpc
import pytest

from kimivl_preprocess.options import add_arguments
from kimivl_preprocess.uploads import UploadGate

METHOD = "/test.Upload/Stream"


class Server:
    """Each request's bytes name its behaviour: b"early:<id>" sends headers on receipt, b"late:<id>"
    only with its message. Every stream then waits for `release` before its one message."""

    def __init__(self):
        self.release = asyncio.Event()
        self.arrived: list[str] = []
        self.cancelled: list[str] = []

    async def handle(self, request: bytes, context):
        mode, _, rid = request.decode().partition(":")
        self.arrived.append(rid)
        try:
            if mode == "early":
                await context.send_initial_metadata(())
            await self.release.wait()
            yield b"done:" + rid.encode()
        except asyncio.CancelledError:
            self.cancelled.append(rid)
            raise


@pytest.fixture
async def loopback():
    srv = Server()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Upload", {
        "Stream": grpc.unary_stream_rpc_method_handler(srv.handle),
    })])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stream = channel.unary_stream(METHOD)
    try:
        yield srv, stream
    finally:
        srv.release.set()
        await channel.close()
        await server.stop(0)


async def _read_all(call) -> list[bytes]:
    return [m async for m in call]


async def test_a_slot_frees_when_the_request_is_received_not_at_the_first_message(loopback):
    srv, stream = loopback
    gate = UploadGate(1, max_wait_s=30)
    first = await asyncio.wait_for(gate.start(lambda: stream(b"early:1")), 10)
    # The first stream is still waiting for `release`; its slot is free all the same.
    second = await asyncio.wait_for(gate.start(lambda: stream(b"early:2")), 10)
    assert srv.arrived == ["1", "2"]
    srv.release.set()
    assert await _read_all(first) == [b"done:1"]
    assert await _read_all(second) == [b"done:2"]


async def test_a_server_without_early_headers_holds_a_slot_at_most_max_wait_s(loopback):
    srv, stream = loopback
    gate = UploadGate(1, max_wait_s=0.3)
    t0 = time.perf_counter()
    first = await gate.start(lambda: stream(b"late:1"))
    second = await gate.start(lambda: stream(b"late:2"))
    waited = time.perf_counter() - t0
    assert 0.5 <= waited < 5, waited  # two waits of 0.3 s, not forever
    srv.release.set()
    assert await _read_all(first) == [b"done:1"]
    assert await _read_all(second) == [b"done:2"]


async def test_waiters_get_slots_in_arrival_order(loopback):
    srv, stream = loopback
    gate = UploadGate(1, max_wait_s=30)
    starts = [asyncio.create_task(gate.start(lambda i=i: stream(f"early:{i}".encode()))) for i in range(6)]
    calls = await asyncio.wait_for(asyncio.gather(*starts), 20)
    assert srv.arrived == [str(i) for i in range(6)]
    srv.release.set()
    for i, call in enumerate(calls):
        assert await _read_all(call) == [f"done:{i}".encode()]


async def test_a_caller_that_leaves_while_uploading_cancels_its_call(loopback):
    srv, stream = loopback
    gate = UploadGate(1, max_wait_s=30)
    leaving = asyncio.create_task(gate.start(lambda: stream(b"late:gone")))
    for _ in range(200):  # until the server has the request (it sends no headers)
        if srv.arrived:
            break
        await asyncio.sleep(0.01)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    for _ in range(200):
        if srv.cancelled:
            break
        await asyncio.sleep(0.01)
    assert srv.cancelled == ["gone"]
    # The slot is free again.
    call = await asyncio.wait_for(gate.start(lambda: stream(b"early:next")), 10)
    srv.release.set()
    assert await _read_all(call) == [b"done:next"]


async def test_no_limit_starts_every_call_at_once(loopback):
    srv, stream = loopback
    gate = UploadGate(0)
    calls = [await gate.start(lambda i=i: stream(f"late:{i}".encode())) for i in range(3)]
    srv.release.set()
    assert [await _read_all(c) for c in calls] == [[b"done:0"], [b"done:1"], [b"done:2"]]


def test_the_option_defaults_to_no_limit_and_refuses_a_negative_one(capsys):
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args(["--model", "m"]).inference_uploads == 0
    assert p.parse_args(["--model", "m", "--inference-uploads", "4"]).inference_uploads == 4
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "m", "--inference-uploads", "-1"])
    assert "--inference-uploads: must be >= 0" in capsys.readouterr().err
