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

from .renewable_channel import RenewableChannel

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

    def __init__(self, target: str, max_message_bytes: int, *, credentials: grpc.ChannelCredentials | None = None,
                 server_name: str | None = None):
        self.target = target
        options = [
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
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        # Renewable: the front door's client certificate rotates without a restart (.inference_tls).
        self.channel = RenewableChannel(target, options, credentials)
        self._generate = self.channel.unary_stream(f"/{INFERENCE_SERVICE}/Generate", request_serializer=None,
                                                   response_deserializer=None)

    def generate(self, request: bytes, timeout_s: float | None, metadata=()):
        """``metadata``: e.g. the trace context (traceparent) for the inference tier."""
        return self._generate(request, timeout=timeout_s, metadata=metadata or None, wait_for_ready=False)

    async def close(self) -> None:
        await self.channel.close()


def client_status(error: grpc.aio.AioRpcError, target: str) -> errors.Status:
    """How a failed inference call is answered to the front door's client. UNAVAILABLE never
    names internal addresses: gRPC's own details list them, so only the tier's own messages (its
    google.rpc ErrorInfo says so) are passed on, others are logged; the tier's retry hint is
    passed on. Other codes are the inference tier's own status, its
    google.rpc details included (it validated what we did not)."""
    code = error.code()
    details = error.details() or ""
    trailers = tuple(error.trailing_metadata() or ())
    if code != grpc.StatusCode.UNAVAILABLE:
        return errors.Status(code, errors.clip(details), tuple((k, v) for k, v in trailers if k == errors.DETAILS_KEY))
    hint = errors.retry_after_s(trailers)
    if hint is not None:  # the tier shed the request (at capacity): its reason (our own words), its hint
        reason = details.rsplit("; retry after", 1)[0] or "at capacity"
        shed = errors.Overloaded(f"inference tier unavailable: {reason}", retry_after_s=hint)
        return errors.status_of(shed, pushback="hint")
    own = errors.own_details(trailers)
    if own is not None:  # the tier's own words (draining, starting, its engine died): no addresses in them
        return errors.status(code, f"inference tier unavailable: {details}", reason=own[0],
                             retry_after_s=own[1] if own[1] is not None else 1.0)
    log.warning("inference tier %s unavailable: %s", target, errors.clip(details, 300))
    return errors.status(code, "inference tier unavailable; retry later", reason=errors.Reason.UNAVAILABLE,
                         retry_after_s=1.0)


class ShedWindow:
    """After the inference tier shed a request on every replica tried, new chats are refused at once
    (before any preprocessing) for as long as its hint says, at most ``max_s``: under a sustained
    overload the answer to a shed chat then costs nothing, and the tier is not sent work it would
    refuse. When the window ends, one chat goes through as a probe while the others are still
    refused: if the tier admits it (its response headers arrive) the window stays closed; if it
    sheds it too, the window opens again. Without the probe every chat arriving while the first
    one is preprocessed would be preprocessed too, only to be shed by the tier. A probe that ends
    without an answer (its client left, a bad request) or runs past ``probe_timeout_s`` makes way
    for the next."""

    PROBE_RETRY_S = 0.1

    def __init__(self, max_s: float = 1.0, probe_timeout_s: float = 5.0):
        self.max_s = max_s
        self.probe_timeout_s = probe_timeout_s
        self._until = 0.0
        self._tripped = False  # shed since the last admitted probe
        self._probe_since: float | None = None

    def observe(self, error: grpc.aio.AioRpcError) -> None:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            hint = errors.retry_after_s(error.trailing_metadata())
            if hint is not None:
                self._tripped = True
                self._until = max(self._until, time.monotonic() + min(hint, self.max_s))

    def check(self) -> bool:
        """Overloaded while the window is open or a probe is out; True when this chat is the probe
        (report its outcome with :meth:`probe_done`)."""
        now = time.monotonic()
        left = self._until - now
        if left > 0:
            raise errors.Overloaded("inference tier unavailable: it shed the last request on every replica tried",
                                    retry_after_s=left)
        if not self._tripped:
            return False
        if self._probe_since is not None and now - self._probe_since < self.probe_timeout_s:
            raise errors.Overloaded("inference tier unavailable: it shed the last request on every replica tried "
                                    "(a probe is checking whether it has room)", retry_after_s=self.PROBE_RETRY_S)
        self._probe_since = now
        return True

    def probe_done(self, admitted: bool) -> None:
        """The probe's outcome: admitted, or not (shed: :meth:`observe` has reopened the window;
        or it never got an answer: the next chat probes)."""
        self._probe_since = None
        if admitted:
            self._tripped = False
