"""Freed memory goes back to the OS after large requests.

A large request (a 60 MB text, a message of many images) is parsed in gRPC's and protobuf's
buffers, hundreds of allocations below glibc's mmap threshold; once freed, glibc keeps those
pages in its arenas, so the process's RSS stays at its peak although Python holds nothing: an
orchestrator sees a pod that never shrinks, and memory limits bite the next burst. After an RPC
whose request was larger than ``LARGE_REQUEST_BYTES``, ``malloc_trim(0)`` returns the free pages
(off the event loop, at most once a second); the image workers do the same after a large image
(:func:`trim_now`), whose bands and intermediates are below the mmap threshold. Not glibc
(musl, macOS): nothing to do.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time

import grpc

log = logging.getLogger("kimivl.hosting")
LARGE_REQUEST_BYTES = 16 << 20
MIN_INTERVAL_S = 1.0


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class Trimmer:
    """Runs ``malloc_trim(0)`` soon after :meth:`poke`, no more than once per ``MIN_INTERVAL_S``."""

    def __init__(self):
        self._trim = _malloc_trim()
        self._last = 0.0
        self._pending = False

    @property
    def available(self) -> bool:
        return self._trim is not None

    def poke(self) -> None:
        if self._trim is None or self._pending:
            return
        self._pending = True
        loop = asyncio.get_running_loop()
        loop.call_later(max(0.0, self._last + MIN_INTERVAL_S - time.monotonic()), self._run, loop)

    def _run(self, loop) -> None:
        fut = loop.run_in_executor(None, self._trim, 0)  # ctypes releases the GIL: it blocks no one
        fut.add_done_callback(self._done)

    def _done(self, fut) -> None:
        self._pending = False
        self._last = time.monotonic()
        if fut.exception() is not None:
            log.debug("malloc_trim failed", exc_info=fut.exception())


TRIMMER = Trimmer()


def trim_now() -> None:
    """``malloc_trim(0)`` in this thread (a worker thread that has just freed a large image)."""
    if TRIMMER._trim is not None:
        TRIMMER._trim(0)


def trim_after_large(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` that pokes the trimmer when its request was large (unary requests only)."""
    if handler.request_streaming or not TRIMMER.available:
        return handler

    def large(request) -> bool:
        size = getattr(request, "ByteSize", None)
        return size is not None and size() > LARGE_REQUEST_BYTES

    if handler.unary_stream:
        inner_stream = handler.unary_stream

        async def stream(request, context):
            try:
                async for msg in inner_stream(request, context):
                    yield msg
            finally:
                if large(request):
                    TRIMMER.poke()

        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
    inner_unary = handler.unary_unary

    async def unary(request, context):
        try:
            return await inner_unary(request, context)
        finally:
            if large(request):
                TRIMMER.poke()

    return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
