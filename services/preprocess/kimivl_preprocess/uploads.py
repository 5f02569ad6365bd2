"""First come, first served uploads of prepared prompts to the inference tier.

A photo's patches are megabytes. Sent all at once over one HTTP/2 connection, the messages
of a burst share its bandwidth frame by frame, so each arrives only when nearly all have
and the engine waits for the whole burst before its first prefill: 100 messages of 5 MB on
loopback, the first arrived after 268 ms, the tenth after 348 ms; with 4 in flight at a time,
after 27 and 80 ms, and the last one sooner too (433 vs 634 ms). On the H200, a burst of 300
photos left ours ~1.3 s behind the engine ceiling.

An upload is over when the inference tier's initial metadata arrives: it sends it on receipt
of a request, before any token. A tier that does not (older versions send it with the first
token) holds a slot for at most ``max_wait_s``.

Off by default (``--inference-uploads 0``). On the H200 the inference tier's event loop, busy
with the burst it has, answers late, so a slot stays taken ~0.24 s: with 4 slots a burst of 300
1 MP photos ran at 16.5 req/s, with no limit at 20.3 and the engine alone at 20.2 (the loopback
server of ``bench/upload_order.py`` answers at once, which is why it showed only the gain).
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
