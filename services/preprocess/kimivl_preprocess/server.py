"""The preprocessing tier's gRPC server: ChatService and PreprocessService.

Transport only: requests are turned into prepared prompts by the pipeline, and Chat
relays the inference tier's stream. Messages that carry patch tensors are serialized by
the codec (straight from the numpy buffers); delta messages are relayed as raw bytes
(ChatResponse and GenerateResponse share one wire layout); only the final result is
parsed, to add this tier's preprocessing time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram, start_http_server

from kimivl.limits import RequestError, check_sampling
from kimivl.v1 import (
    chat_pb2,
    inference_pb2,
    inference_pb2_grpc,
    preprocess_pb2,
    types_pb2,
)

from .codec import PROTO_TO_DTYPE, generate_request, preprocess_response
from .image import ProcessorConfig
from .options import MiB
from .pipeline import Preprocessor
from .pool import ImagePool
from .sources import FetchPolicy, ImageFetcher
from .uploads import UploadGate

log = logging.getLogger("kimivl.preprocess")

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
PREPROCESS_SERVICE = preprocess_pb2.DESCRIPTOR.services_by_name["PreprocessService"].full_name
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


REQUESTS = Counter("kimivl_preprocess_requests_total", "RPCs by method and gRPC status", ["method", "code"])
PREPROCESS_SECONDS = Histogram("kimivl_preprocess_seconds", "Image fetch/decode/processing and tokenization",
                               buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
IMAGES = Counter("kimivl_preprocess_images_total", "Images preprocessed")
UPLOAD_SECONDS = Histogram("kimivl_preprocess_upload_seconds",
                           "Chat: wait for an upload slot and the inference tier's receipt "
                           "(--inference-uploads; ~0 without a limit, where the call starts at once)",
                           buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5))
CHAT_TTFT = Histogram("kimivl_chat_time_to_first_token_seconds", "Chat: arrival to first relayed token",
                      buckets=(.025, .05, .1, .25, .5, 1, 2, 4, 8, 16, 32))

# Round-robin across every address the target resolves to (a headless Service gives one
# per inference pod), skipping pods whose grpc.health.v1 status is not SERVING (starting,
# draining), and retry UNAVAILABLE: gRPC only retries before the first response arrives,
# so a stream that has started is never replayed.
INFERENCE_SERVICE_CONFIG = {
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
_DELTA_TAG = 0x0A  # field 1 (delta), wire type 2: the first byte of every delta message
_RESULT_TAG = 0x12  # field 2 (result)


def _serialize(msg) -> bytes:
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


class ChatServicer:
    def __init__(self, preprocessor: Preprocessor, inference: inference_pb2_grpc.InferenceServiceStub,
                 target: str, wire_dtype: str, uploads: UploadGate | None = None):
        self.pre = preprocessor
        self.inference = inference
        self.target = target
        self.wire_dtype = wire_dtype
        self.uploads = uploads or UploadGate(0)

    async def Chat(self, request: chat_pb2.ChatRequest, context: grpc.aio.ServicerContext):
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            check_sampling(request.sampling, request.thinking)
            with PREPROCESS_SECONDS.time():
                prepared = await self.pre.prepare(request, self.wire_dtype)
            IMAGES.inc(prepared.prompt.images)
            rid = request.request_id or uuid.uuid4().hex
            message = generate_request(prepared.prompt, sampling=request.sampling, thinking=request.thinking,
                                       request_id=rid)
            with UPLOAD_SECONDS.time():
                call = await self.uploads.start(lambda: self.inference.Generate(
                    message, timeout=context.time_remaining(), wait_for_ready=False))
            first = True
            try:
                async for raw in call:
                    if first:
                        CHAT_TTFT.observe(time.perf_counter() - t0)
                        first = False
                    if raw[:1] == bytes([_RESULT_TAG]):
                        yield self._with_front_door_timings(raw, prepared.preprocess_ms, t0)
                    else:
                        yield raw
            finally:
                call.cancel()  # no-op once finished; aborts the engine request if the client left
        except RequestError as e:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if e.resource_exhausted else grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(e))
        except grpc.aio.AioRpcError as e:
            code = e.code()
            details = e.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE:
                details = f"inference tier unavailable at {self.target}: {details}"
            await context.abort(code, details)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:  # a bug, not bad input: log it, answer a clean status
            log.exception("Chat %s failed", request.request_id)
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, f"internal error: {type(e).__name__}")
        finally:
            REQUESTS.labels("Chat", code.name).inc()

    @staticmethod
    def _with_front_door_timings(raw: bytes, preprocess_ms: float, t0: float) -> chat_pb2.ChatResponse:
        msg = chat_pb2.ChatResponse.FromString(raw)
        t = msg.result.timings
        inference_total = t.total_ms
        t.preprocess_ms = preprocess_ms
        t.total_ms = (time.perf_counter() - t0) * 1e3
        # First token as the caller saw it: everything before inference's own TTFT.
        t.time_to_first_token_ms += t.total_ms - inference_total
        return msg


class PreprocessServicer:
    def __init__(self, preprocessor: Preprocessor):
        self.pre = preprocessor

    async def Preprocess(self, request, context):
        code = grpc.StatusCode.OK
        try:
            with PREPROCESS_SECONDS.time():
                dtype = PROTO_TO_DTYPE.get(request.dtype)
                if dtype is None:  # proto3 enums are open: any number can arrive
                    raise RequestError(f"dtype {request.dtype} is not a TensorDtype; use one of "
                                       f"{', '.join(types_pb2.TensorDtype.keys())}")
                prepared = await self.pre.prepare(request, dtype)
            IMAGES.inc(prepared.prompt.images)
            return preprocess_response(prepared.prompt, prompt_text=prepared.prompt_text,
                                       preprocess_ms=prepared.preprocess_ms)
        except RequestError as e:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if e.resource_exhausted else grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(code, str(e))
        except Exception as e:  # a bug, not bad input: log it, answer a clean status
            log.exception("Preprocess failed")
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, f"internal error: {type(e).__name__}")
        finally:
            REQUESTS.labels("Preprocess", code.name).inc()


async def serve(args: argparse.Namespace) -> None:
    max_msg = args.max_message_mb * MiB
    pool = ImagePool(ProcessorConfig.from_model_dir(args.model), workers=args.workers,
                     max_pixels=args.max_image_pixels)
    fetcher = ImageFetcher(FetchPolicy(max_image_bytes=args.max_image_bytes, timeout_s=args.url_timeout_s,
                                       max_redirects=args.url_max_redirects, allow_private=args.allow_private_urls))
    preprocessor = Preprocessor(args.model, pool, fetcher, max_images=args.max_images,
                                max_model_len=args.max_model_len, max_tensor_bytes=max_msg - 16 * MiB)
    channel = grpc.aio.insecure_channel(args.inference_target, options=[
        ("grpc.service_config", json.dumps(INFERENCE_SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        # Retries replay the buffered request; image requests are MBs, above the 256 KiB default.
        ("grpc.per_rpc_retry_buffer_size", max_msg),
        ("grpc.retry_buffer_size", 4 * max_msg),
        ("grpc.max_send_message_length", max_msg),
        ("grpc.max_receive_message_length", max_msg),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.dns_min_time_between_resolutions_ms", 5_000),
    ])
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    # Requests go as the codec's bytes; deltas come back as raw bytes and are relayed untouched.
    stub.Generate = channel.unary_stream(f"/{INFERENCE_SERVICE}/Generate", request_serializer=None,
                                         response_deserializer=None)

    server = grpc.aio.server(options=[
        ("grpc.max_send_message_length", max_msg),
        ("grpc.max_receive_message_length", max_msg),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ])
    chat = ChatServicer(preprocessor, stub, args.inference_target, args.wire_dtype,
                        UploadGate(args.inference_uploads))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(CHAT_SERVICE, {
        "Chat": grpc.unary_stream_rpc_method_handler(
            chat.Chat, request_deserializer=chat_pb2.ChatRequest.FromString, response_serializer=_serialize),
    })])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(PREPROCESS_SERVICE, {
        "Preprocess": grpc.unary_unary_rpc_method_handler(
            PreprocessServicer(preprocessor).Preprocess, request_deserializer=preprocess_pb2.PreprocessRequest.FromString,
            response_serializer=_serialize),
    })])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [CHAT_SERVICE, PREPROCESS_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME], server)
    host = f"[{args.host}]" if ":" in args.host else args.host  # IPv6 literals need brackets
    if bool(args.tls_cert_file) != bool(args.tls_key_file):
        raise SystemExit("--tls-cert-file and --tls-key-file go together")
    if args.tls_cert_file:
        with open(args.tls_key_file, "rb") as k, open(args.tls_cert_file, "rb") as c:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        bound = server.add_secure_port(f"{host}:{args.port}", creds)
    else:
        bound = server.add_insecure_port(f"{host}:{args.port}")
    if bound == 0:
        raise SystemExit(f"cannot listen on {args.host}:{args.port}")
    if args.metrics_port:
        start_http_server(args.metrics_port)
    await server.start()
    for name in ("", CHAT_SERVICE, PREPROCESS_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("preprocess tier serving on %s:%d (inference target %s, %s image workers)",
             args.host, bound, args.inference_target, pool.workers)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining: refusing new RPCs, up to %.0f s for in-flight ones", args.drain_timeout_s)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=args.drain_timeout_s)
    await channel.close()
    await fetcher.close()
    pool.close()


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    asyncio.run(serve(args))
    return 0
