"""Certificates rotate without restarts, when their files change as a Kubernetes Secret's do
(kubelet swaps a ``..data`` symlink): the inference tier's server certificate for new
connections, the front door's client certificate for new calls, and calls in flight finish."""
from __future__ import annotations

import asyncio
import time
from concurrent import futures

import grpc
import pytest

from certs import CA, SecretVolume, tls_secret
from conftest import start_preprocess
from fake_inference import INFERENCE_SERVICE, thinking_then_answer
from kimivl.client import Client
from kimivl_hosting.grpc_host import GrpcHost
from kimivl_hosting.tls import channel_credentials, server_tls
from kimivl_preprocess import inference_tls
from kimivl_preprocess.renewable_channel import RenewableChannel

SERVICE = "test.v1.Who"


def _cn(context) -> str:
    """The common name of the certificate the peer presented."""
    return b"".join(context.auth_context().get("x509_common_name", [b"?"])).decode()


async def _until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_server_certificate_follows_a_secret_update(tmp_path):
    old_ca, new_ca = CA("old CA"), CA("new CA")
    volume = SecretVolume(tmp_path / "tls", tls_secret(old_ca, old_ca.issue("kimivl-inference", server=True)))
    (tmp_path / "old.pem").write_bytes(old_ca.pem)
    (tmp_path / "new.pem").write_bytes(new_ca.pem)

    async def echo(request, context):
        return request

    host = GrpcHost([SERVICE], max_message_bytes=1 << 20)
    host.add_handlers(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    port = host.bind("127.0.0.1", 0, server_tls(volume.path("tls.crt"), volume.path("tls.key")).credentials())
    await host.start(serving=True)

    async def echo_with(ca_file):
        async with grpc.aio.secure_channel(f"localhost:{port}", channel_credentials(ca_file)) as ch:
            return await ch.unary_unary(f"/{SERVICE}/Echo")(b"hi", timeout=5)

    try:
        assert await echo_with(str(tmp_path / "old.pem")) == b"hi"
        volume.update(tls_secret(new_ca, new_ca.issue("kimivl-inference", server=True)))
        assert await echo_with(str(tmp_path / "new.pem")) == b"hi"
        with pytest.raises(grpc.aio.AioRpcError):
            await echo_with(str(tmp_path / "old.pem"))
    finally:
        await host.drain(0)


async def test_client_certificate_renews_new_calls_while_a_stream_finishes_on_the_old(tmp_path):
    server_ca, client_ca = CA("inference CA"), CA("front doors CA")
    cert, key = server_ca.write(tmp_path, "kimivl-inference", server=True)
    (tmp_path / "client-ca.pem").write_bytes(client_ca.pem)
    # The front door's Secret: its client certificate and the CA that signs the inference tier's.
    first = client_ca.issue("front-door-1", server=False)
    volume = SecretVolume(tmp_path / "client", {"tls.crt": first[0], "tls.key": first[1], "ca.crt": server_ca.pem})
    release = asyncio.Event()

    async def who(request, context):
        yield _cn(context).encode()
        if request == b"hold":
            await release.wait()
            yield _cn(context).encode()

    host = GrpcHost([SERVICE], max_message_bytes=1 << 20)
    host.add_handlers(SERVICE, {"Who": grpc.unary_stream_rpc_method_handler(who)})
    port = host.bind("127.0.0.1", 0, server_tls(str(cert), str(key), str(tmp_path / "client-ca.pem")).credentials())
    await host.start(serving=True)
    files = (volume.path("ca.crt"), volume.path("tls.crt"), volume.path("tls.key"))
    channel = RenewableChannel(f"localhost:{port}", [], channel_credentials(*files))
    ask = channel.unary_stream(f"/{SERVICE}/Who")
    follow = asyncio.create_task(inference_tls.follow(channel, *files, period_s=0.05))

    async def whoami() -> str:
        return b"".join([m async for m in ask(b"", timeout=5)]).decode()

    try:
        assert await whoami() == "front-door-1"
        held = ask(b"hold", timeout=30)
        assert await held.read() == b"front-door-1"

        # A certificate without its key (files copied one by one): not taken up.
        second = client_ca.issue("front-door-2", server=False)
        (volume.dir / "tls.crt").unlink()
        (volume.dir / "tls.crt").write_bytes(second[0])
        await asyncio.sleep(0.3)
        assert await whoami() == "front-door-1" and channel.retiring == 0

        # The whole Secret renewed at once, as the kubelet does.
        (volume.dir / "tls.crt").unlink()
        (volume.dir / "tls.crt").symlink_to("..data/tls.crt")
        volume.update({"tls.crt": second[0], "tls.key": second[1], "ca.crt": server_ca.pem})
        await _until(lambda: channel.retiring == 1)
        assert await whoami() == "front-door-2"
        # The stream started before the renewal is still on the old connection; the old channel
        # closes once it has ended.
        release.set()
        assert await held.read() == b"front-door-1"
        assert await held.read() == grpc.aio.EOF
        await _until(lambda: channel.retiring == 0)
        assert await whoami() == "front-door-2"
    finally:
        follow.cancel()
        release.set()
        await channel.close()
        await host.drain(0)


async def test_a_retired_channel_closes_after_its_limit_whatever_is_left(tmp_path):
    ca = CA("inference CA")
    cert, key = ca.write(tmp_path, "kimivl-inference", server=True)
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    forever = asyncio.Event()

    async def hang(request, context):
        yield b"started"
        await forever.wait()

    host = GrpcHost([SERVICE], max_message_bytes=1 << 20)
    host.add_handlers(SERVICE, {"Hang": grpc.unary_stream_rpc_method_handler(hang)})
    port = host.bind("127.0.0.1", 0, server_tls(str(cert), str(key)).credentials())
    await host.start(serving=True)
    creds = channel_credentials(str(tmp_path / "ca.pem"))
    channel = RenewableChannel(f"localhost:{port}", [], creds, retire_after_s=0.3)
    try:
        call = channel.unary_stream(f"/{SERVICE}/Hang")(b"", timeout=30)
        assert await call.read() == b"started"
        channel.renew(creds)
        await _until(lambda: channel.retiring == 0, 5)
        assert await call.code() == grpc.StatusCode.CANCELLED  # closing the channel ended it
    finally:
        forever.set()
        await channel.close()
        await host.drain(0)


class _MtlsInference:
    """A scripted InferenceService that requires client certificates of ``client_ca`` and records
    the common name each Generate came with."""

    def __init__(self, cert_and_key: tuple[bytes, bytes], client_ca: CA):
        self.names: list[str] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        replies = thinking_then_answer(["hm"], ["yes"])

        def generate(request, context):
            self.names.append(_cn(context))
            yield from replies

        handler = grpc.unary_stream_rpc_method_handler(
            generate, request_deserializer=None, response_serializer=lambda m: m.SerializeToString())
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(INFERENCE_SERVICE,
                                                                                   {"Generate": handler})])
        creds = grpc.ssl_server_credentials([(cert_and_key[1], cert_and_key[0])], root_certificates=client_ca.pem,
                                            require_client_auth=True)
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)


def test_front_door_presents_a_renewed_client_certificate_without_a_restart(tiny_model, tmp_path):
    server_ca, client_ca = CA("inference CA"), CA("front doors CA")
    inference = _MtlsInference(server_ca.issue("kimivl-inference", server=True), client_ca)
    volume = SecretVolume(tmp_path / "tls", tls_secret(server_ca, client_ca.issue("front-door-1", server=False)))
    inference.server.start()
    srv = start_preprocess(f"localhost:{inference.port}", extra=[
        "--inference-tls-ca-file", volume.path("ca.crt"), "--inference-tls-cert-file", volume.path("tls.crt"),
        "--inference-tls-key-file", volume.path("tls.key")])
    try:
        srv.wait_serving(180)  # a busy machine: importing transformers alone can take a while
        with Client(srv.target, timeout_s=30) as c:
            assert c.chat(["Hello"]).answer == "yes"
            assert inference.names == ["front-door-1"]
            volume.update(tls_secret(server_ca, client_ca.issue("front-door-2", server=False)))
            deadline = time.monotonic() + 60  # the front door looks every 10 s
            while inference.names[-1] != "front-door-2":
                assert time.monotonic() < deadline, f"still {inference.names[-1]}; see {srv.log_path}"
                time.sleep(1)
                assert c.chat(["Hello again"]).answer == "yes"
        assert srv.proc.poll() is None
    finally:
        srv.stop()
        inference.server.stop(0)

