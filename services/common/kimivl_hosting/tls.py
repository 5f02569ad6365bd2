"""TLS for both tiers: server credentials that follow their files, and the front door's client
credentials towards the inference tier (mutual TLS between the tiers).

Server side, certificates are read again whenever a file changes (gRPC asks for the
configuration at each new handshake; a stat of three files is all it costs), so a rotated
Kubernetes Secret takes effect for new connections without a restart, and connections already
up keep the certificate they were made with until ``grpc.max_connection_age_ms`` cycles them.
Client side (the front door's channel), gRPC cannot swap credentials on a live channel: the
front door looks at its files every few seconds and, when they change, opens a new channel for
new calls (kimivl_preprocess.inference_tls); calls in flight finish on the old one.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import grpc

log = logging.getLogger("kimivl.tls")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@dataclass(frozen=True)
class ServerTls:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None  # given: clients must present a certificate it signed

    def _stamp(self) -> tuple:
        return tuple(os.stat(p).st_mtime_ns for p in self._files())

    def _files(self) -> list[str]:
        return [p for p in (self.cert_file, self.key_file, self.client_ca_file) if p]

    def _config(self):
        return grpc.ssl_server_certificate_configuration(
            [(_read(self.key_file), _read(self.cert_file))],
            root_certificates=_read(self.client_ca_file) if self.client_ca_file else None)

    def credentials(self) -> grpc.ServerCredentials:
        state = {"stamp": self._stamp()}

        def fetch():
            try:
                stamp = self._stamp()
                if stamp == state["stamp"]:
                    return None  # unchanged: gRPC keeps the current configuration
                config = self._config()
            except (OSError, ValueError) as e:  # a half-written Secret: keep serving the old one
                log.warning("TLS files changed but cannot be read (%s); keeping the current certificate", e)
                return None
            state["stamp"] = stamp
            log.info("TLS certificate reloaded from %s", self.cert_file)
            return config

        return grpc.dynamic_ssl_server_credentials(self._config(), fetch,
                                                   require_client_authentication=bool(self.client_ca_file))


def server_tls(cert_file: str | None, key_file: str | None, client_ca_file: str | None = None,
               flag_prefix: str = "--tls") -> ServerTls | None:
    """Validated flags -> ServerTls (None when TLS is off)."""
    if bool(cert_file) != bool(key_file):
        raise SystemExit(f"{flag_prefix}-cert-file and {flag_prefix}-key-file go together")
    if client_ca_file and not cert_file:
        raise SystemExit(f"{flag_prefix}-client-ca-file needs {flag_prefix}-cert-file and {flag_prefix}-key-file")
    if not cert_file:
        return None
    for path in (cert_file, key_file, client_ca_file):
        if path and not os.path.isfile(path):
            raise SystemExit(f"TLS file {path} does not exist")
    return ServerTls(cert_file, key_file, client_ca_file)


def channel_credentials(ca_file: str | None, cert_file: str | None = None,
                        key_file: str | None = None) -> grpc.ChannelCredentials | None:
    """The front door's credentials towards the inference tier: verify it against ``ca_file``, and
    present ``cert_file``/``key_file`` (mutual TLS). None = plaintext."""
    if bool(cert_file) != bool(key_file):
        raise SystemExit("--inference-tls-cert-file and --inference-tls-key-file go together")
    if not ca_file:
        if cert_file:
            raise SystemExit("--inference-tls-cert-file needs --inference-tls-ca-file")
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file),
        private_key=_read(key_file) if key_file else None,
        certificate_chain=_read(cert_file) if cert_file else None)
