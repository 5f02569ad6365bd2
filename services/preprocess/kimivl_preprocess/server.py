"""The preprocessing tier's process: wiring and lifecycle.

Builds the pipeline (image pool, fetcher, prompt builder, admission budgets), the channel to
the inference tier and the gRPC services, serves them SERVING at once (this tier has nothing to
warm), and drains on SIGTERM: health NOT_SERVING, new RPCs refused, in-flight ones finish within
``--drain-timeout-s``; what is left is cancelled, its work in threads stops at its next step, and
the process exits within about a second more even if a thread is still busy (a worker thread
cannot be stopped from outside, and Python would otherwise wait for it).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
import time
import warnings

from PIL import Image

from kimivl_contract.processor import ProcessorConfig
from kimivl_hosting import tracing
from kimivl_hosting.grpc_host import GrpcHost
from kimivl_hosting.options import connection_options
from kimivl_hosting.tls import channel_credentials, server_tls

from . import auth, inference_tls
from .admission import FrontDoorBudgets
from .chat import ChatFlow
from .grpc_auth import ApiKeyInterceptor
from .inference_client import InferenceClient
from .options import MiB
from .pipeline import Preprocessor
from .pool import ImagePool
from .servicers import CHAT_SERVICE, PREPROCESS_SERVICE, ChatServicer, PreprocessServicer, handlers
from .sources import FetchPolicy, ImageFetcher
from .uploads import UploadGate

log = logging.getLogger("kimivl.preprocess")


def _tls_note(tls) -> str:
    if tls is None:
        return "plaintext"
    return "TLS, client certificates required" if tls.client_ca_file else "TLS"


def http_body_limit(max_message_bytes: int) -> int:
    """The HTTP body limit: what one gRPC message may hold, base64-encoded (JSON carries images
    as data URIs), plus 1 MiB for the JSON around it."""
    return max_message_bytes * 4 // 3 + MiB


async def serve(args: argparse.Namespace) -> None:
    tracing.configure("kimivl-preprocess", args.otlp_traces_endpoint)
    max_msg = args.max_message_mb * MiB
    tls = server_tls(args.tls_cert_file, args.tls_key_file, args.tls_client_ca_file)
    inference_credentials = channel_credentials(args.inference_tls_ca_file, args.inference_tls_cert_file,
                                                args.inference_tls_key_file)
    pool = ImagePool(ProcessorConfig.from_model_dir(args.model), workers=args.workers,
                     max_pixels=args.max_image_pixels)
    fetcher = ImageFetcher(FetchPolicy(max_image_bytes=args.max_image_bytes, timeout_s=args.url_timeout_s,
                                       max_redirects=args.url_max_redirects, allow_private=args.allow_private_urls))
    budgets = FrontDoorBudgets.from_options(
        max_preparing=args.max_preparing, max_queued=args.max_queued, max_queue_wait_s=args.max_queue_wait_s,
        max_decode_mb=args.max_decode_mb, max_images=args.max_images,
        largest_image_bytes=12 * args.max_image_pixels)  # a largest RGB image, EXIF-turned, with its resize
    preprocessor = Preprocessor(args.model, pool, fetcher, max_images=args.max_images,
                                max_model_len=args.max_model_len, max_tensor_bytes=max_msg - 16 * MiB,
                                max_text_chars=args.max_text_chars, max_request_pixels=args.max_request_pixels,
                                budgets=budgets)
    inference = InferenceClient(args.inference_target, max_msg, credentials=inference_credentials,
                                server_name=args.inference_tls_server_name)
    renewal = asyncio.create_task(inference_tls.follow(
        inference.channel, args.inference_tls_ca_file, args.inference_tls_cert_file,
        args.inference_tls_key_file)) if inference_credentials else None
    flow = ChatFlow(preprocessor, inference, args.wire_dtype, UploadGate(args.inference_uploads))
    keys = auth.load(args.api_keys_file)

    services = [CHAT_SERVICE, PREPROCESS_SERVICE]
    host = GrpcHost(services, max_message_bytes=max_msg, options=connection_options(args),
                    interceptors=[ApiKeyInterceptor(keys, services)] if keys else ())
    for service, methods in handlers(ChatServicer(flow), PreprocessServicer(preprocessor)).items():
        host.add_handlers(service, methods)
    bound = host.bind(args.host, args.port, tls.credentials() if tls else None)
    if args.health_port:  # for probes that cannot do TLS
        log.info("health Check in plaintext on %s:%d", args.host, host.bind_health(args.host, args.health_port))
    http = None
    if args.http_port:
        from .openai.server import OpenAIServer, ssl_context

        http = OpenAIServer(flow, models=args.served_model_name or [os.path.basename(os.path.normpath(args.model))],
                            max_model_len=preprocessor.max_model_len, max_body_bytes=http_body_limit(max_msg),
                            keys=keys)
        http_bound = await http.start(args.host, args.http_port, ssl_context(args.tls_cert_file, args.tls_key_file))
    await host.start(serving=True, metrics_port=args.metrics_port)
    log.info("preprocess tier serving on %s:%d (%s; inference target %s over %s, %s image workers; admission: "
             "%d preparing, %d queued, %.0f MiB decoding; text up to %d characters)",
             args.host, bound, _tls_note(tls), args.inference_target,
             "mutual TLS" if args.inference_tls_cert_file else "TLS" if inference_credentials else "plaintext",
             pool.workers, budgets.requests.capacity, budgets.requests.max_queue, budgets.decode.capacity / MiB,
             preprocessor.max_text_chars)
    if http:
        log.info("OpenAI-compatible HTTP API on %s:%d (models %s, bodies up to %d MiB)", args.host, http_bound,
                 ", ".join(http.models), http.max_body_bytes // MiB)

    await host.stop.wait()
    log.info("draining: refusing new RPCs, up to %.0f s for the %d in flight", args.drain_timeout_s, host.in_flight)
    await asyncio.gather(host.drain(args.drain_timeout_s), *([http.drain(args.drain_timeout_s)] if http else []))
    if renewal:
        renewal.cancel()
    await inference.close()
    await fetcher.close()
    pool.close(wait=False)
    preprocessor.close(wait=False)
    tracing.shutdown()
    busy = await _busy_threads(grace_s=1.0)
    if busy:
        log.warning("exiting with %d worker threads still busy (%s)", len(busy), ", ".join(busy))


async def _busy_threads(grace_s: float) -> list[str]:
    """Names of worker threads still running after ``grace_s`` (idle pool threads have exited)."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + grace_s
    try:
        await asyncio.wait_for(loop.shutdown_default_executor(), grace_s)
    except asyncio.TimeoutError:
        pass
    for t in threading.enumerate():  # the server has stopped: blocking the loop here is harmless
        if t is not threading.current_thread() and not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon
            and t.is_alive()]


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The tier's own limit (--max-image-pixels) applies; Pillow's warning below it is noise.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    asyncio.run(serve(args))
    # Exit now: a busy worker thread would hold a normal exit until it ends, and tearing down the
    # interpreter (the tokenizers' vocabularies, among others) takes seconds the drain did not budget.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
