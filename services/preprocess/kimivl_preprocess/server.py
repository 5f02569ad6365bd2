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

import grpc
from PIL import Image

from kimivl_contract.processor import ProcessorConfig
from kimivl_hosting.grpc_host import GrpcHost

from .admission import FrontDoorBudgets
from .chat import ChatFlow
from .inference_client import InferenceClient
from .options import MiB
from .pipeline import Preprocessor
from .pool import ImagePool
from .servicers import CHAT_SERVICE, PREPROCESS_SERVICE, ChatServicer, PreprocessServicer, handlers
from .sources import FetchPolicy, ImageFetcher
from .uploads import UploadGate

log = logging.getLogger("kimivl.preprocess")


def _credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    if bool(args.tls_cert_file) != bool(args.tls_key_file):
        raise SystemExit("--tls-cert-file and --tls-key-file go together")
    if not args.tls_cert_file:
        return None
    with open(args.tls_key_file, "rb") as k, open(args.tls_cert_file, "rb") as c:
        return grpc.ssl_server_credentials([(k.read(), c.read())])


async def serve(args: argparse.Namespace) -> None:
    max_msg = args.max_message_mb * MiB
    credentials = _credentials(args)
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
    inference = InferenceClient(args.inference_target, max_msg)
    flow = ChatFlow(preprocessor, inference, args.wire_dtype, UploadGate(args.inference_uploads))

    host = GrpcHost([CHAT_SERVICE, PREPROCESS_SERVICE], max_message_bytes=max_msg)
    for service, methods in handlers(ChatServicer(flow), PreprocessServicer(preprocessor)).items():
        host.add_handlers(service, methods)
    bound = host.bind(args.host, args.port, credentials)
    await host.start(serving=True, metrics_port=args.metrics_port)
    log.info("preprocess tier serving on %s:%d (inference target %s, %s image workers; admission: %d preparing, "
             "%d queued, %.0f MiB decoding; text up to %d characters)", args.host, bound, args.inference_target,
             pool.workers, budgets.requests.capacity, budgets.requests.max_queue, budgets.decode.capacity / MiB,
             preprocessor.max_text_chars)

    await host.stop.wait()
    log.info("draining: refusing new RPCs, up to %.0f s for in-flight ones", args.drain_timeout_s)
    await host.drain(args.drain_timeout_s)
    await inference.close()
    await fetcher.close()
    pool.close(wait=False)
    preprocessor.close(wait=False)
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
