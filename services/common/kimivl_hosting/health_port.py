"""A plaintext port that answers grpc.health.v1 ``Check`` and nothing else, for probes that cannot
do TLS.

The kubelet's native gRPC probes speak plaintext HTTP/2 and present no client certificate, so
they fail against a TLS or mutual-TLS port. This port answers from the main port's own
HealthServicer (the same statuses, NOT_SERVING while draining) and serves no tier service, no
reflection and no ``Watch`` (a stream any peer could hold open): with the main port requiring
client certificates, what it tells an unauthenticated peer is SERVING or NOT_SERVING. Keep it
closed to other pods all the same (kubelet probes come from the node).
"""
from __future__ import annotations

from collections.abc import Iterable

import grpc
from grpc_health.v1 import health, health_pb2

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class HealthPort:
    """``Check`` of ``servicer`` on a plaintext port of its own server (same event loop)."""

    def __init__(self, servicer: health.aio.HealthServicer, options: Iterable = ()):
        # The connection limits of the main port (idle, age, handshake); requests are a service name.
        # No SO_REUSEPORT: a port already taken (the main one, say) must fail to bind, not be shared
        # with it, connection by connection.
        self.server = grpc.aio.server(options=[*options, ("grpc.max_receive_message_length", 4096),
                                               ("grpc.max_concurrent_streams", 8), ("grpc.so_reuseport", 0)])
        check = grpc.unary_unary_rpc_method_handler(
            servicer.Check, request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString)
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(HEALTH_SERVICE, {"Check": check})])

    def bind(self, host: str, port: int) -> int:
        """Listen on ``host:port`` in plaintext; the port bound. Exits if it cannot."""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = self.server.add_insecure_port(address)
        except RuntimeError:  # newer grpcio raises where older ones returned 0
            bound = 0
        if bound == 0:
            raise SystemExit(f"cannot listen on {host}:{port} (--health-port)")
        return bound

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(grace=0)
