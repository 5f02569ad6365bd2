"""One tier's gRPC server as an orchestrator sees it.

Both tiers serve grpc.health.v1 (per service and overall) and reflection, listen on one port
(IPv6 literals bracketed), stop on SIGTERM/SIGINT and drain. Draining keeps the port open:
health answers NOT_SERVING (a probe that got "connection refused" could not tell a draining pod
from a dead one, and clients balancing on health move away at once), new RPCs of the tier's own
services are refused with UNAVAILABLE (clients retry them elsewhere), and in-flight ones get the
grace period; then the server stops. What differs (when SERVING starts, what ends the process)
stays in each tier's ``server.py``.
"""
from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterable

import grpc
from google.rpc import error_details_pb2  # noqa: F401 - reflection serves google.rpc.* (see GrpcHost)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from kimivl_contract import errors

from .malformed import refuse_malformed
from .memory import trim_after_large

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
DRAINING = "this replica is draining; retry on another"  # UNAVAILABLE's message (HTTP: 503)


def base_server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


class _Drain(grpc.aio.ServerInterceptor):
    """Counts the tier's in-flight RPCs and refuses new ones once draining (health and
    reflection stay served)."""

    def __init__(self, services: list[str]):
        self.prefixes = tuple(f"/{s}/" for s in services)
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefixes):
            return handler
        if self.draining:
            return refusal(handler, grpc.StatusCode.UNAVAILABLE, DRAINING, reason=errors.Reason.UNAVAILABLE,
                           retry_after_s=0.1)
        return _counted(handler, self)

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


def refusal(handler, code: grpc.StatusCode, details: str, *, reason: str, retry_after_s: float | None = None):
    """A handler of ``handler``'s kind that answers ``code`` / ``details`` with the error details
    (for interceptors). The request stays bytes (never parsed), and the status is set, not raised
    (see errors.answer)."""
    def refuse(request, context):
        errors.answer_with(context, code, details, reason=reason, retry_after_s=retry_after_s)

    async def refuse_unary(request, context):
        refuse(request, context)

    async def refuse_stream(request, context):
        refuse(request, context)
        return
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, None, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(refuse_unary, None, handler.response_serializer)


def _counted(handler, drain: _Drain):
    if handler.unary_stream:
        inner = handler.unary_stream

        async def stream(request, context):
            drain.enter()
            try:
                async for msg in inner(request, context):
                    yield msg
            finally:
                drain.leave()

        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        inner = handler.unary_unary

        async def unary(request, context):
            drain.enter()
            try:
                return await inner(request, context)
            finally:
                drain.leave()

        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
    return handler


class GrpcHost:
    """A grpc.aio server serving ``services`` (full names) plus health and reflection.

    Reflection also serves the google.rpc error detail types (imported above, so they are in the
    descriptor pool before the first refusal): grpcurl resolves a status's details through it.
    """

    def __init__(self, services: Iterable[str], *, max_message_bytes: int, options: Iterable = (),
                 interceptors: Iterable[grpc.aio.ServerInterceptor] = ()):
        self.services = list(services)
        self._drain = _Drain(self.services)
        self._options = list(options)
        self.server = grpc.aio.server(interceptors=[self._drain, *interceptors],
                                      options=[*base_server_options(max_message_bytes), *self._options])
        self._health_port = None
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([*self.services, HEALTH_SERVICE, reflection.SERVICE_NAME], self.server)
        self.stop = asyncio.Event()

    def add_handlers(self, service: str, handlers: dict) -> None:
        """``handlers`` (method name -> RpcMethodHandler) of ``service``; request bytes that do not
        parse are answered INVALID_ARGUMENT before they reach them (:mod:`.malformed`), and the
        memory of large requests is given back to the OS after them (:mod:`.memory`)."""
        handlers = {name: trim_after_large(refuse_malformed(h)) for name, h in handlers.items()}
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, handlers)])

    def bind(self, host: str, port: int, credentials: grpc.ServerCredentials | None = None) -> int:
        """Listen on ``host:port``; the port bound (``port`` 0 picks one). Exits if it cannot."""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        bound = (self.server.add_secure_port(address, credentials) if credentials
                 else self.server.add_insecure_port(address))
        if bound == 0:
            raise SystemExit(f"cannot listen on {host}:{port}")
        return bound

    def bind_health(self, host: str, port: int) -> int:
        """Also answer health ``Check`` in plaintext on ``host:port`` (:mod:`.health_port`: for probes
        that cannot do TLS); the port bound. Up from :meth:`start` until the drain has stopped the server."""
        from .health_port import HealthPort

        self._health_port = HealthPort(self.health, self._options)
        return self._health_port.bind(host, port)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.services):
            await self.health.set(name, status)

    async def start(self, *, serving: bool, metrics_port: int = 0) -> None:
        """Health first (so the first probe gets an answer), then the port, then /metrics."""
        await self.set_serving(serving)
        await self.server.start()
        if self._health_port:
            await self._health_port.start()
        if metrics_port:
            start_http_server(metrics_port)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)

    @property
    def in_flight(self) -> int:
        return self._drain.in_flight

    async def drain(self, grace_s: float) -> None:
        """NOT_SERVING for every service, refuse new RPCs, give in-flight ones up to ``grace_s``,
        then stop (cancelling what is left)."""
        self._drain.draining = True
        await self.health.enter_graceful_shutdown()
        try:
            await asyncio.wait_for(self._drain.idle.wait(), timeout=max(grace_s, 0))
        except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
            pass
        await self.server.stop(grace=0)
        if self._health_port:
            await self._health_port.stop()
