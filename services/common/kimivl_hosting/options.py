"""Command-line options both tiers share: connection limits and TLS (argparse only, so `--help`
stays instant)."""
from __future__ import annotations

import argparse


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def add_connection_arguments(p: argparse.ArgumentParser, *, age_s: float, age_grace_s: float) -> None:
    g = p.add_argument_group("connections")
    g.add_argument("--max-connection-idle-s", type=_positive_seconds, default=300.0,
                   help="close a connection that has carried no RPC for this long (default %(default)g)")
    g.add_argument("--max-connection-age-s", type=_positive_seconds, default=age_s,
                   help="ask clients to reconnect after this long, so they re-resolve and rebalance "
                        "(default %(default)g)")
    g.add_argument("--max-connection-age-grace-s", type=_positive_seconds, default=age_grace_s,
                   help="how long RPCs in flight may finish on a connection past its age (default %(default)g)")
    g.add_argument("--handshake-timeout-s", type=_positive_seconds, default=10.0,
                   help="close a connection that has not finished its TLS/HTTP/2 handshake in this time "
                        "(silent sockets; default %(default)g)")


def connection_options(args: argparse.Namespace) -> list[tuple[str, int]]:
    ms = lambda s: int(s * 1000)  # noqa: E731
    return [
        ("grpc.max_connection_idle_ms", ms(args.max_connection_idle_s)),
        ("grpc.max_connection_age_ms", ms(args.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", ms(args.max_connection_age_grace_s)),
        ("grpc.server_handshake_timeout_ms", ms(args.handshake_timeout_s)),
    ]


def add_server_tls_arguments(p: argparse.ArgumentParser, *, who: str) -> None:
    g = p.add_argument_group("TLS")
    g.add_argument("--tls-cert-file", help="serve TLS with this PEM certificate chain (with --tls-key-file); "
                                           "re-read when the file changes")
    g.add_argument("--tls-key-file", help="PEM private key for --tls-cert-file")
    g.add_argument("--tls-client-ca-file",
                   help=f"require every client to present a certificate signed by this PEM CA (mutual TLS; "
                        f"{who})")
    g.add_argument("--health-port", type=int, default=0,
                   help="also answer grpc.health.v1 Check, and nothing else, in plaintext on this port, for probes "
                        "that cannot do TLS (the kubelet's gRPC probes); 0 = off (default). Keep it closed to "
                        "other pods")


def add_tracing_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--otlp-traces-endpoint", default=None, metavar="URL",
                   help="send OpenTelemetry traces here (OTLP over gRPC, or HTTP with "
                        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf; the OTEL_* variables apply). "
                        "Off when unset; W3C traceparent from callers is honoured and passed on")
