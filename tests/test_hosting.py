"""kimivl_hosting.GrpcHost on loopback: health, and draining that keeps the port open."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kimivl_hosting.grpc_host import GrpcHost

SERVICE = "test.v1.Slow"


async def _host(release: asyncio.Event):
    async def stream(request, context):
        yield b"first"
        await release.wait()
        yield b"last"

    host = GrpcHost([SERVICE], max_message_bytes=1 << 20)
    host.add_handlers(SERVICE, {"Stream": grpc.unary_stream_rpc_method_handler(
        stream, request_deserializer=None, response_serializer=None)})
    port = host.bind("127.0.0.1", 0)
    await host.start(serving=True)
    return host, f"127.0.0.1:{port}"


async def _health(channel, service=""):
    return (await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=2)).status


async def test_draining_answers_not_serving_refuses_new_rpcs_and_lets_in_flight_ones_finish():
    release = asyncio.Event()
    host, target = await _host(release)
    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.unary_stream(f"/{SERVICE}/Stream")(b"")
        assert await call.read() == b"first"
        assert host.in_flight == 1
        drained = asyncio.create_task(host.drain(grace_s=30))
        await asyncio.sleep(0.2)
        assert await _health(ch) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await _health(ch, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await ch.unary_stream(f"/{SERVICE}/Stream")(b"").read()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e.value.details()
        assert not drained.done()  # waits for the stream in flight
        release.set()
        assert await call.read() == b"last"
        await asyncio.wait_for(drained, 5)  # done as soon as nothing is in flight, not after the grace


async def test_drain_cancels_what_outlives_the_grace():
    host, target = await _host(asyncio.Event())  # never released
    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.unary_stream(f"/{SERVICE}/Stream")(b"")
        assert await call.read() == b"first"
        await asyncio.wait_for(host.drain(grace_s=0.5), 5)
        with pytest.raises(grpc.aio.AioRpcError):
            await call.read()
