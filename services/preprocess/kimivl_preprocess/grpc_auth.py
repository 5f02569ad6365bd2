"""API keys on the gRPC port: a server interceptor in front of ChatService and PreprocessService.

Health and reflection stay open (probes and tools carry no keys). A refused RPC answers
UNAUTHENTICATED before its request is deserialized or any work is done.
"""
from __future__ import annotations

import grpc

from kimivl_contract.errors import Unauthenticated
from kimivl_hosting.grpc_host import refusal

from .auth import ApiKeys


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys, services: list[str]):
        self.keys = keys
        self.prefixes = tuple(f"/{s}/" for s in services)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefixes):
            return handler
        authorization = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode("latin-1")
                break
        try:
            self.keys.check(authorization)
        except Unauthenticated as e:
            return refusal(handler, e.code, str(e), reason=e.reason)
        return handler
