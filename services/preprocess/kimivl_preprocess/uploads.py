"""An optional limit on prepared prompts uploading to the inference tier at once, in arrival order.

A photo's patches are megabytes. Sent all at once over one HTTP/2 connection, the messages
of a burst share its bandwidth frame by frame, so each arrives only when nearly all have:
100 messages of 5 MB on a loopback server that answers at once, the first arrived after 268 ms;
with 4 in flight at a time, after 27 ms (``bench/upload_order.py``).

An upload is over when the inference tier's initial metadata arrives: it sends it on receipt
of a request, before any token. A tier that does not (older versions send it with the first
token) holds a slot for at most ``max_wait_s``.

Off by default (``--inference-uploads 0``): the real inference tier answers when its event
loop gets to the request. On the H200, busy with a burst of 300 1 MP photos, that took ~0.24 s
a slot, so with 4 slots the burst ran at 16.5 req/s; with no limit at 20.3, the engine alone
at 20.2 (docs/benchmarks.md, runs e and g).
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable


class UploadGate:
    """At most ``limit`` requests uploading at once (0 = no limit); waiters go in arrival order."""

    def __init__(self, limit: int, max_wait_s: float = 1.0):
        self.limit = limit
        self.max_wait_s = max_wait_s
        self._slots = asyncio.Semaphore(limit) if limit > 0 else None

    async def start(self, make_call: Callable):
        """``make_call()`` (a started grpc.aio call) once a slot is free; returns it once its
        request is received (or ``max_wait_s`` has passed). Cancelled meanwhile, it cancels the call."""
        if self._slots is None:
            return make_call()
        async with self._slots:
            call = make_call()
            received = asyncio.ensure_future(call.initial_metadata())
            received.add_done_callback(_ignore_outcome)
            try:
                await asyncio.wait({received}, timeout=self.max_wait_s)
            except BaseException:
                call.cancel()
                raise
        return call


def _ignore_outcome(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # a failed call's error surfaces when the caller reads the stream
