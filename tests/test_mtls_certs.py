"""scripts/mtls_certs.sh: the Secrets of k8s/components/mtls made by hand, used by the real TLS
code of both tiers (the inference tier's server credentials, the front door's channel)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml

from certs import CA
from kimivl_hosting.grpc_host import GrpcHost
from kimivl_hosting.tls import channel_credentials, server_tls

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "test.v1.Echo"
FQDN = "kimivl-inference.kimivl.svc.cluster.local"  # what the overlays' --inference-target dials

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _make(directory: Path, namespace: str = "kimivl") -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "mtls_certs.sh"), str(directory), namespace],
                   check=True, capture_output=True, timeout=60)


async def _host(inference: Path):
    async def echo(request, context):
        return request

    host = GrpcHost([SERVICE], max_message_bytes=1 << 20)
    host.add_handlers(SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    port = host.bind("127.0.0.1", 0, server_tls(str(inference / "tls.crt"), str(inference / "tls.key"),
                                                str(inference / "ca.crt")).credentials())
    await host.start(serving=True)
    return host, port


async def _echo(port: int, creds, name: str = FQDN) -> bytes:
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds,
                                       options=[("grpc.ssl_target_name_override", name)]) as ch:
        return await ch.unary_unary(f"/{SERVICE}/Echo")(b"hi", timeout=5)


async def test_hand_made_secrets_give_mutual_tls_between_the_tiers(tmp_path):
    _make(tmp_path)
    inference, front = tmp_path / "kimivl-inference-tls", tmp_path / "kimivl-preprocess-client-tls"
    # Exactly the Secrets' keys (kubectl create secret --from-file=DIR makes one key per file).
    assert sorted(p.name for p in inference.iterdir()) == sorted(p.name for p in front.iterdir()) == \
        ["ca.crt", "tls.crt", "tls.key"]
    if shutil.which("kubectl"):  # the documented command, client side
        out = subprocess.run(["kubectl", "-n", "kimivl", "create", "secret", "generic", "kimivl-inference-tls",
                              f"--from-file={inference}", "--dry-run=client", "-o", "yaml"],
                             check=True, capture_output=True, text=True, timeout=60).stdout
        assert sorted(yaml.safe_load(out)["data"]) == ["ca.crt", "tls.crt", "tls.key"]
    host, port = await _host(inference)
    front_files = [str(front / "ca.crt"), str(front / "tls.crt"), str(front / "tls.key")]
    try:
        assert await _echo(port, channel_credentials(*front_files)) == b"hi"
        # The certificate names the Service in the namespace given, not in another.
        with pytest.raises(grpc.aio.AioRpcError):
            await _echo(port, channel_credentials(*front_files), "kimivl-inference.other.svc.cluster.local")
        # No client certificate, or one of another CA: refused.
        stranger = CA("someone else").write(tmp_path / "stranger", "intruder", server=False)
        for creds in (channel_credentials(front_files[0]),
                      channel_credentials(front_files[0], *map(str, stranger))):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _echo(port, creds)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE

        # Renewal: new leaves from the same CA; the tier takes up its new certificate for new
        # connections, and a front door still holding the old one is admitted until it renews.
        old = [Path(p).read_bytes() for p in front_files]
        _make(tmp_path)
        assert (tmp_path / "ca" / "ca.crt").read_bytes() == old[0] == (front / "ca.crt").read_bytes()
        assert (front / "tls.crt").read_bytes() != old[1]
        held = tmp_path / "held"
        held.mkdir()
        for name, data in zip(("ca.crt", "tls.crt", "tls.key"), old, strict=True):
            (held / name).write_bytes(data)
        assert await _echo(port, channel_credentials(*front_files)) == b"hi"
        assert await _echo(port, channel_credentials(str(held / "ca.crt"), str(held / "tls.crt"),
                                                     str(held / "tls.key"))) == b"hi"
    finally:
        await host.drain(0)
