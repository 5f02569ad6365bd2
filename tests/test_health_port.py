"""The plaintext health port (--health-port): what the kubelet's gRPC probes reach when the tier's
own port requires mutual TLS. It must tell the main port's health, follow the drain, and serve
nothing else."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from certs import CA
from conftest import free_port, start_preprocess
from kimivl_hosting.grpc_host import GrpcHost
from kimivl_hosting.tls import channel_credentials, server_tls

SERVICE = "test.v1.Slow"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def _check(target: str, service: str = "") -> int:
    """What the kubelet's gRPC probe does: plaintext, no certificate, Check(service)."""
    async with grpc.aio.insecure_channel(target) as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return r.status


async def _code(target: str, method: str, request: bytes = b"") -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.unary_stream(method)(request, timeout=5)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as e:
            return e.code()
        return grpc.StatusCode.OK


async def test_health_port_tells_the_mtls_port_health_follows_the_drain_and_serves_nothing_else(tmp_path):
    server_ca, client_ca = CA("inference tier CA"), CA("front doors CA")
    cert, key = server_ca.write(tmp_path, "server", server=True)
    client_cert, client_key = client_ca.write(tmp_path, "client", server=False)
    (tmp_path / "client-ca.pem").write_bytes(client_ca.pem)
    (tmp_path / "server-ca.pem").write_bytes(server_ca.pem)
    release = asyncio.Event()

    async def slow(request, context):
        await release.wait()
        return request

    host = GrpcHost([SERVICE], max_message_bytes=1 << 20)
    host.add_handlers(SERVICE, {"Slow": grpc.unary_unary_rpc_method_handler(slow)})
    port = host.bind("127.0.0.1", 0, server_tls(str(cert), str(key), str(tmp_path / "client-ca.pem")).credentials())
    health = f"127.0.0.1:{host.bind_health('127.0.0.1', 0)}"
    await host.start(serving=False)
    drain = None
    try:
        assert await _check(health) == NOT_SERVING
        await host.set_serving(True)
        assert await _check(health) == SERVING and await _check(health, SERVICE) == SERVING
        # The probe's plaintext Check cannot reach the mutual-TLS port itself.
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _check(f"127.0.0.1:{port}")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # Only Check: not the tier's service, not Watch, not reflection.
        assert await _code(health, "/grpc.health.v1.Health/Watch",
                           health_pb2.HealthCheckRequest().SerializeToString()) == grpc.StatusCode.UNIMPLEMENTED
        assert await _code(health, f"/{SERVICE}/Slow") == grpc.StatusCode.UNIMPLEMENTED
        assert await _code(health, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == \
            grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _check(health, "no.such.Service")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND

        # An RPC in flight over mTLS holds the drain open; meanwhile the probe sees NOT_SERVING.
        creds = channel_credentials(str(tmp_path / "server-ca.pem"), str(client_cert), str(client_key))
        async with grpc.aio.secure_channel(f"localhost:{port}", creds) as ch:
            call = ch.unary_unary(f"/{SERVICE}/Slow")(b"x", timeout=20)
            for _ in range(500):
                if host.in_flight or call.done():
                    break
                await asyncio.sleep(0.01)
            assert host.in_flight == 1, "the RPC over mTLS did not start"
            drain = asyncio.create_task(host.drain(20))
            await asyncio.sleep(0.1)
            assert await _check(health) == NOT_SERVING and await _check(health, SERVICE) == NOT_SERVING
            release.set()
            assert await call == b"x"
        await asyncio.wait_for(drain, 10)
        # Stopped with the server: a probe now gets no answer at all.
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _check(health)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        release.set()
        if drain is None:
            await host.drain(0)


def test_health_port_is_refused_when_taken():
    host = GrpcHost([SERVICE], max_message_bytes=1 << 20)
    port = host.bind("127.0.0.1", 0)
    with pytest.raises(SystemExit, match="--health-port"):
        host.bind_health("127.0.0.1", port)


def test_front_door_with_tls_answers_probes_on_its_health_port(tiny_model, tmp_path):
    """The real tier: --tls-* on its port, --health-port for the probes."""
    ca = CA("front door CA")
    cert, key = ca.write(tmp_path, "front-door", server=True)
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    health_port = free_port()
    srv = start_preprocess("localhost:1", extra=["--tls-cert-file", str(cert), "--tls-key-file", str(key),
                                                 "--tls-client-ca-file", str(tmp_path / "ca.pem"),
                                                 "--health-port", str(health_port)])
    health = f"127.0.0.1:{health_port}"
    try:
        deadline = time.monotonic() + 180  # a busy machine: importing transformers can take a while
        while True:
            try:
                status = asyncio.run(_check(health, "kimivl.v1.ChatService"))
                break
            except grpc.aio.AioRpcError:
                assert srv.proc.poll() is None, f"the front door exited; see {srv.log_path}"
                assert time.monotonic() < deadline, "no answer on the health port"
                time.sleep(0.5)
        assert status == SERVING
        with pytest.raises(grpc.aio.AioRpcError):  # the TLS port itself refuses plaintext
            asyncio.run(_check(srv.target))
    finally:
        srv.stop()
