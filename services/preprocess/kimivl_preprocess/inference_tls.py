"""The front door's TLS files towards the inference tier, followed while it runs.

Every ``period_s`` the CA, certificate and key files (--inference-tls-*) are read again; when
their contents have changed and load as a matching pair, the channel to the inference tier is
renewed with them (:mod:`.renewable_channel`: new calls use the new certificate, calls in flight
finish on the old connection). So a renewed Kubernetes Secret (kubelet swaps all its files at
once, about a minute after the change) rotates the client certificate without a restart. A
certificate and key that do not match (files copied one by one, caught in between) are skipped
until they do.
"""
from __future__ import annotations

import asyncio
import logging
import ssl

from kimivl_hosting.tls import channel_credentials

from .renewable_channel import RenewableChannel

log = logging.getLogger("kimivl.preprocess")

PERIOD_S = 10.0


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def _loads(ca_file: str, cert_file: str | None, key_file: str | None) -> None:
    """Raises (ssl.SSLError, ValueError, OSError) unless the CA parses and the key is the certificate's."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=ca_file)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)


async def follow(channel: RenewableChannel, ca_file: str, cert_file: str | None = None,
                 key_file: str | None = None, *, period_s: float = PERIOD_S) -> None:
    """Renew ``channel`` whenever the files change (runs until cancelled)."""
    files = (ca_file, cert_file, key_file)
    current = tuple(_read(p) for p in files)
    while True:
        await asyncio.sleep(period_s)
        try:
            contents = tuple(_read(p) for p in files)
            if contents == current:
                continue
            _loads(*files)
            credentials = channel_credentials(*files)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            log.warning("TLS files towards the inference tier changed but do not load (%s); "
                        "keeping the current ones", e)
            continue
        try:
            channel.renew(credentials)
        except Exception:  # noqa: BLE001 - the follower must outlive one failed renewal
            log.exception("renewing the channel to the inference tier failed; keeping the current one")
            continue
        current = contents
        log.info("TLS files towards the inference tier changed (%s): new calls use them", cert_file or ca_file)
