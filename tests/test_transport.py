"""Transport security and connection limits: mutual TLS between the tiers (with certificates that
reload), and connections that hold a port without using it."""
from __future__ import annotations

import asyncio
import shutil
import socket
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from certs import CA
from conftest import free_port, start_inference, start_preprocess
from kimivl.client import Client, Unavailable
from kimivl_devtools.launch import TierProcess
from kimivl_hosting.grpc_host import GrpcHost
from kimivl_hosting.tls import channel_credentials, server_tls

SERVICE = "test.v1.Echo"


async def _tls_host(tmp_path, ca: CA, client_ca: CA | None):
    cert, key = ca.write(tmp_path, "server", server=True)
    client_ca_file = None
    if client_ca:
        client_ca_file = tmp_path / "client-ca.pem"
        client_ca_file.write_bytes(client_ca.pem)
    tls = server_tls(str(cert), str(key), str(client_ca_file) if client_ca_file else None)

    async def echo(request, context):
        return request

    host = GrpcHost([SERVICE], max_message_bytes=1 << 20)
    host.add_handlers(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    port = host.bind("127.0.0.1", 0, tls.credentials())
    await host.start(serving=True)
    return host, f"localhost:{port}", cert, key


async def _echo(target, creds) -> bytes:
    async with grpc.aio.secure_channel(target, creds) as ch:
        return await ch.unary_unary(f"/{SERVICE}/Echo")(b"hi", timeout=5)


async def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(tmp_path):
    server_ca, client_ca, stranger = CA("server CA"), CA("front doors"), CA("someone else")
    host, target, *_ = await _tls_host(tmp_path, server_ca, client_ca)
    (tmp_path / "server-ca.pem").write_bytes(server_ca.pem)
    good_cert, good_key = client_ca.write(tmp_path / "good", "front-door", server=False)
    bad_cert, bad_key = stranger.write(tmp_path / "bad", "intruder", server=False)
    ca_file = str(tmp_path / "server-ca.pem")
    try:
        assert await _echo(target, channel_credentials(ca_file, str(good_cert), str(good_key))) == b"hi"
        for creds in (channel_credentials(ca_file), channel_credentials(ca_file, str(bad_cert), str(bad_key))):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _echo(target, creds)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(target) as ch:  # plaintext to a TLS port
            with pytest.raises(grpc.aio.AioRpcError):
                await ch.unary_unary(f"/{SERVICE}/Echo")(b"hi", timeout=5)
    finally:
        await host.drain(0)


async def test_a_rotated_server_certificate_is_served_to_new_connections_without_a_restart(tmp_path):
    old_ca, new_ca = CA("old"), CA("new")
    host, target, cert, key = await _tls_host(tmp_path, old_ca, None)
    (tmp_path / "old.pem").write_bytes(old_ca.pem)
    (tmp_path / "new.pem").write_bytes(new_ca.pem)
    try:
        assert await _echo(target, channel_credentials(str(tmp_path / "old.pem"))) == b"hi"
        new_cert, new_key = new_ca.write(tmp_path / "next", "server", server=True)
        time.sleep(0.01)  # a later mtime
        shutil.copy(new_key, key)
        shutil.copy(new_cert, cert)
        assert await _echo(target, channel_credentials(str(tmp_path / "new.pem"))) == b"hi"
        with pytest.raises(grpc.aio.AioRpcError):
            await _echo(target, channel_credentials(str(tmp_path / "old.pem")))
    finally:
        await host.drain(0)


def test_tls_flags_are_checked_at_start(tmp_path):
    with pytest.raises(SystemExit, match="go together"):
        server_tls(str(tmp_path / "c"), None)
    with pytest.raises(SystemExit, match="needs"):
        server_tls(None, None, str(tmp_path / "ca"))
    with pytest.raises(SystemExit, match="does not exist"):
        server_tls(str(tmp_path / "c"), str(tmp_path / "k"))
    with pytest.raises(SystemExit, match="needs --inference-tls-ca-file"):
        channel_credentials(None, "c", "k")


@pytest.fixture(scope="module")
def limited_front_door(tiny_model):
    srv = start_preprocess(f"127.0.0.1:{free_port()}", extra=["--handshake-timeout-s", "1",
                                                             "--max-connection-idle-s", "2"])
    try:
        srv.wait_serving(60)
        yield srv
    finally:
        srv.stop()


def _closed(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        while sock.recv(4096):  # the server's HTTP/2 preface may come first
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_silent_connections_are_closed_after_the_handshake_timeout(limited_front_door):
    socks = [socket.create_connection(("127.0.0.1", limited_front_door.port)) for _ in range(50)]
    try:
        t0 = time.monotonic()
        assert all(_closed(s, 10) for s in socks)
        assert time.monotonic() - t0 < 10
    finally:
        for s in socks:
            s.close()


def test_idle_connections_are_closed(limited_front_door):
    async def run():
        async with grpc.aio.insecure_channel(limited_front_door.target) as ch:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert ch.get_state() == grpc.ChannelConnectivity.READY
            deadline = time.monotonic() + 10
            while ch.get_state() == grpc.ChannelConnectivity.READY and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            return ch.get_state()

    assert asyncio.run(run()) != grpc.ChannelConnectivity.READY  # the server sent GOAWAY


@pytest.mark.engine
def test_tiers_talk_over_mutual_tls(tmp_path):
    server_ca, client_ca = CA("inference"), CA("front doors")
    cert, key = server_ca.write(tmp_path, "kimivl-inference", server=True)
    client_cert, client_key = client_ca.write(tmp_path, "front-door", server=False)
    (tmp_path / "server-ca.pem").write_bytes(server_ca.pem)
    (tmp_path / "client-ca.pem").write_bytes(client_ca.pem)
    health_port = free_port()
    inf = start_inference(extra=["--tls-cert-file", str(cert), "--tls-key-file", str(key),
                                 "--tls-client-ca-file", str(tmp_path / "client-ca.pem"),
                                 "--health-port", str(health_port)])
    tls = ["--inference-tls-ca-file", str(tmp_path / "server-ca.pem"),
           "--inference-tls-server-name", "kimivl-inference"]
    with_cert = start_preprocess(f"localhost:{inf.port}", extra=[
        *tls, "--inference-tls-cert-file", str(client_cert), "--inference-tls-key-file", str(client_key)])
    without = start_preprocess(f"localhost:{inf.port}", extra=tls)
    try:
        with grpc.secure_channel(inf.target, grpc.ssl_channel_credentials(server_ca.pem),
                                 options=[("grpc.ssl_target_name_override", "kimivl-inference")]) as ch:
            with pytest.raises(grpc.RpcError):  # no client certificate: the handshake fails
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        # What the kubelet's probes reach: plaintext health Check on --health-port, NOT_SERVING
        # while the engine starts, then SERVING.
        probe = TierProcess("inference", [], health_port, start=False)
        seen = []
        deadline = time.monotonic() + 600  # vLLM's start on a busy CPU machine
        while not seen or seen[-1] != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline and inf.proc.poll() is None, "the engine did not start"
            status = probe.health("kimivl.v1.InferenceService")
            if status is not None and status not in seen:
                seen.append(status)
            time.sleep(0.5)
        assert seen == [health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING]
        with Client(with_cert.target, timeout_s=300) as c:
            while True:  # health needs a client certificate too: wait through the front door
                try:
                    r = c.chat(["Hello over mTLS"], sampling={"max_tokens": 4, "temperature": 0.0})
                    break
                except Unavailable:
                    if time.monotonic() > deadline or inf.proc.poll() is not None:
                        raise
                    time.sleep(1)
        assert r.usage.answer_tokens + r.usage.thinking_tokens == 4
        without.wait_serving(60)
        with Client(without.target, timeout_s=30) as c, pytest.raises(Unavailable):
            c.chat(["Hello without a certificate"], sampling={"max_tokens": 4})
    finally:
        for srv in (with_cert, without, inf):
            srv.stop()
