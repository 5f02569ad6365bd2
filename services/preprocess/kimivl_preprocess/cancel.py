"""Cancellation that reaches worker threads.

A coroutine cancelled (the client left, its deadline passed, the server is stopping) cannot
stop the thread its work was handed to: ``run_in_executor`` and ``asyncio.to_thread`` only
drop the result. So the work itself is cut into steps (decoder input blocks, row bands of a
resize, batches of text) that check a :class:`CancelToken` the request sets when it ends.
"""
from __future__ import annotations

import threading


class Abandoned(BaseException):  # noqa: N818 - not an error: nobody wants the result any more
    """Raised inside worker-thread work whose request has ended (BaseException, so that the
    ``except Exception`` around decoders does not turn it into an image error)."""


class CancelToken:
    __slots__ = ("_event",)

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Abandoned()
