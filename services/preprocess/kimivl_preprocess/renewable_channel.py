"""A gRPC channel whose credentials can be replaced while calls are in flight.

gRPC cannot change a live channel's credentials, so :meth:`RenewableChannel.renew` opens a new
channel for the calls that start from then on, and retires the old one: it is closed once every
call started on it has ended (each is counted from its start to its done callback), or after
``retire_after_s`` whatever is still on it. Closing a channel ends its calls, so an old one must
not be closed, nor dropped for the garbage collector to close, while a stream is on it.
"""
from __future__ import annotations

import asyncio
import logging

import grpc

log = logging.getLogger("kimivl.preprocess")

# As long as the inference tier lets a stream outlive its connection's age (--max-connection-age-grace-s).
RETIRE_AFTER_S = 3600.0


class _Generation:
    def __init__(self, channel: grpc.aio.Channel):
        self.channel = channel
        self.methods: dict = {}
        self.active = 0
        self.timer: asyncio.TimerHandle | None = None


class RenewableChannel:
    def __init__(self, target: str, options: list, credentials: grpc.ChannelCredentials | None = None, *,
                 retire_after_s: float = RETIRE_AFTER_S):
        self.target = target
        self._options = list(options)
        self.retire_after_s = retire_after_s
        self._current = self._open(credentials)
        self._retiring: set[_Generation] = set()
        self._closing: set[asyncio.Task] = set()

    def _open(self, credentials) -> _Generation:
        return _Generation(grpc.aio.secure_channel(self.target, credentials, options=self._options) if credentials
                           else grpc.aio.insecure_channel(self.target, options=self._options))

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel new calls go over."""
        return self._current.channel

    @property
    def retiring(self) -> int:
        """Old channels still open for calls started before a renewal."""
        return len(self._retiring)

    def unary_stream(self, method: str, **serializers):
        """Like ``Channel.unary_stream``: a callable that starts each call on the current channel."""
        def invoke(*args, **kwargs):
            gen = self._current
            multicallable = gen.methods.get(method)
            if multicallable is None:
                multicallable = gen.methods[method] = gen.channel.unary_stream(method, **serializers)
            call = multicallable(*args, **kwargs)
            gen.active += 1
            call.add_done_callback(lambda _call: self._ended(gen))
            return call

        return invoke

    def renew(self, credentials: grpc.ChannelCredentials | None) -> None:
        """New calls go over a new channel with ``credentials``; the old one retires."""
        old, self._current = self._current, self._open(credentials)
        self._retiring.add(old)
        if old.active == 0:
            self._close(old)
        else:
            old.timer = asyncio.get_running_loop().call_later(self.retire_after_s, self._close, old)

    def _ended(self, gen: _Generation) -> None:
        gen.active -= 1
        if gen.active == 0 and gen in self._retiring:
            self._close(gen)

    def _close(self, gen: _Generation) -> None:
        if gen not in self._retiring:
            return
        self._retiring.discard(gen)
        if gen.timer is not None:
            gen.timer.cancel()
        if gen.active:
            log.warning("closing a channel to %s with %d calls still on it, %g s after its renewal",
                        self.target, gen.active, self.retire_after_s)
        task = asyncio.ensure_future(gen.channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for gen in list(self._retiring):
            self._close(gen)
        await asyncio.gather(self._current.channel.close(), *self._closing)
