"""The front door's channel to the inference tier.

Round-robin across every address the target resolves to (a headless Service gives one per
inference pod), skipping pods whose grpc.health.v1 status is not SERVING (starting, draining),
and retrying UNAVAILABLE: gRPC only retries before the first response arrives, so a stream that
has started is never replayed. Requests go as the codec's bytes and responses come back as raw
bytes, relayed untouched (only the final result is parsed).
"""
from __future__ import annotations

import json
import logging
import time

import grpc

from kimivl.v1 import inference_pb2
from kimivl_contract import errors

log = logging.getLogger("kimivl.preprocess")

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": INFERENCE_SERVICE},
    "methodConfig": [{
        "name": [{"service": INFERENCE_SERVICE}],
        "retryPolicy": {
            "maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }],
}


class InferenceClient:
    """``generate(request_bytes, timeout_s)``: a started call streaming raw GenerateResponse bytes."""

    def __init__(self, target: str, max_message_bytes: int):
        self.target = target
        self.channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
            ("grpc.enable_retries", 1),
            # Retries replay the buffered request; image requests are MBs, above the 256 KiB default.
            ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
            ("grpc.retry_buffer_size", 4 * max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.dns_min_time_between_resolutions_ms", 5_000),
        ])
        self._generate = self.channel.unary_stream(f"/{INFERENCE_SERVICE}/Generate", request_serializer=None,
                                                   response_deserializer=None)

    def generate(self, request: bytes, timeout_s: float | None):
        return self._generate(request, timeout=timeout_s, wait_for_ready=False)

    async def close(self) -> None:
        await self.channel.close()


def client_status(error: grpc.aio.AioRpcError, target: str) -> tuple[grpc.StatusCode, str, tuple]:
    """How a failed inference call is answered to the front door's client: (code, message,
    trailing metadata). UNAVAILABLE never names internal addresses (gRPC's own details list
    them; they are logged instead) and passes on the inference tier's retry hint."""
    code = error.code()
    details = error.details() or ""
    if code != grpc.StatusCode.UNAVAILABLE:
        return code, errors.client_message(details), ()
    hint = errors.retry_after_s(error.trailing_metadata())
    if hint is not None:  # the tier shed the request (at capacity): its reason (our own words), its hint
        reason = details.rsplit("; retry after", 1)[0] or "at capacity"
        shed = errors.Overloaded(f"inference tier unavailable: {reason}", retry_after_s=hint)
        return code, str(shed), shed.trailing_metadata(pushback="hint")
    log.warning("inference tier %s unavailable: %s", target, errors.client_message(details, 300))
    return code, "inference tier unavailable; retry later", ()


class ShedWindow:
    """After the inference tier shed a request on every replica tried, new chats are refused at once
    (before any preprocessing) for as long as its hint says, at most ``max_s``: under a sustained
    overload the answer to a shed chat then costs nothing, and the tier is not sent work it would
    refuse. The next chat after the window goes through and reopens it if it is shed too."""

    def __init__(self, max_s: float = 1.0):
        self.max_s = max_s
        self._until = 0.0

    def observe(self, error: grpc.aio.AioRpcError) -> None:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            hint = errors.retry_after_s(error.trailing_metadata())
            if hint is not None:
                self._until = max(self._until, time.monotonic() + min(hint, self.max_s))

    def check(self) -> None:
        """Overloaded while the window is open."""
        left = self._until - time.monotonic()
        if left > 0:
            raise errors.Overloaded("inference tier unavailable: it shed the last request on every replica tried",
                                    retry_after_s=left)
