"""Admission budgets: load beyond what a tier can take waits in a bounded queue or is shed at once.

A :class:`Budget` holds at most ``capacity`` units (requests, bytes, pixels) at once. A request
that does not fit waits in arrival order, at most ``max_queue`` of them and each at most
``max_wait_s``; past either it is refused with :class:`~kimivl_contract.errors.Overloaded`
(UNAVAILABLE with a retry hint), before it has cost anything. Shedding at once keeps the
answer to a refused request fast, and the queue bound keeps the latency of admitted ones bounded
(at most ``max_wait_s`` more than an idle tier's).

A request that would wait longer than it may is shed on arrival, not after waiting: once a few
holds have been released, the wait ahead of a newcomer is predicted as the queue's length times
the time between releases (Little's law over the recent hold times); past ``max_wait_s``, or
past the caller's remaining deadline, it is refused at once (``reason=expected_wait``). The
timeout stays for a prediction that was too hopeful.

A request asking for more than the whole capacity is admitted alone (its amount is counted as
the capacity): the per-request limits, not the budget, decide whether it is too big.

The retry hint is the time the queue ahead would take to drain at the rate holds have been
released lately (a moving average of hold times), between 50 ms and 30 s.

Metrics, labelled by budget name: ``kimivl_admission_in_use``, ``kimivl_admission_capacity``,
``kimivl_admission_queued``, ``kimivl_admission_shed_total{reason=queue_full|expected_wait|timeout}``,
``kimivl_admission_wait_seconds``.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from contextlib import asynccontextmanager

from prometheus_client import Counter, Gauge, Histogram

from kimivl_contract.errors import Overloaded

IN_USE = Gauge("kimivl_admission_in_use", "Units held by admitted requests", ["budget"])
CAPACITY = Gauge("kimivl_admission_capacity", "Units the budget admits at once (0: no limit)", ["budget"])
QUEUED = Gauge("kimivl_admission_queued", "Requests waiting for the budget", ["budget"])
SHED = Counter("kimivl_admission_shed_total", "Requests refused by the budget", ["budget", "reason"])
WAIT = Histogram("kimivl_admission_wait_seconds", "Time admitted requests waited for the budget", ["budget"],
                 buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))

MIN_HINT_S, MAX_HINT_S = 0.05, 30.0
# Releases observed before the wait is predicted (before that the hold-time average is a guess).
PREDICT_AFTER_RELEASES = 8


class Permit:
    """Units held until :meth:`release` (idempotent)."""

    __slots__ = ("_budget", "amount", "_since")

    def __init__(self, budget: Budget, amount: int):
        self._budget = budget
        self.amount = amount
        self._since = time.monotonic()

    def release(self) -> None:
        if self._budget is not None:
            budget, self._budget = self._budget, None
            budget._release(self.amount, time.monotonic() - self._since)


class Budget:
    """``capacity`` units (0 = no limit), ``max_queue`` waiters, ``max_wait_s`` per waiter.

    ``describe``: what is at capacity, for the refusal's message (e.g. "the front door"); ``unit``:
    what is counted (e.g. "requests preparing").
    """

    def __init__(self, name: str, capacity: int, *, max_queue: int, max_wait_s: float, describe: str,
                 unit: str):
        if capacity < 0 or max_queue < 0 or not max_wait_s >= 0:
            raise ValueError(f"budget {name}: capacity, max_queue and max_wait_s must be >= 0")
        self.name = name
        self.capacity = capacity
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.describe = describe
        self.unit = unit
        self.used = 0
        self.holders = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()
        self._hold_s = 1.0  # moving average of hold times, seconds
        self._released = 0
        CAPACITY.labels(name).set(capacity)
        IN_USE.labels(name).set(0)
        QUEUED.labels(name).set(0)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def expected_wait_s(self) -> float:
        """The wait ahead of a request queued now: one release per waiter ahead and itself."""
        return (self.queued + 1) * self._hold_s / max(1, self.holders)

    def retry_after_s(self) -> float:
        """About when a request refused now would be admitted."""
        if self.capacity == 0:
            return MIN_HINT_S
        return min(MAX_HINT_S, max(MIN_HINT_S, self.expected_wait_s()))

    async def acquire(self, amount: int = 1, *, deadline_s: float | None = None) -> Permit:
        """A permit for ``amount`` units, waiting in turn; Overloaded when the queue is full, the
        predicted wait is longer than ``max_wait_s`` or ``deadline_s`` (the caller's time left),
        or the wait turns out too long."""
        if self.capacity == 0:
            return Permit(self, 0)
        amount = min(max(int(amount), 0), self.capacity)
        if not self._waiters and self.used + amount <= self.capacity:
            self._take(amount)
            return Permit(self, amount)
        if len(self._waiters) >= self.max_queue or self.max_wait_s == 0:
            self._shed("queue_full")
        limit_s = self.max_wait_s if deadline_s is None else max(0.0, min(self.max_wait_s, deadline_s))
        if self._released >= PREDICT_AFTER_RELEASES and self.expected_wait_s() > limit_s:
            self._shed("expected_wait", limit_s=limit_s)
        t0 = time.monotonic()
        waiter = (amount, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        QUEUED.labels(self.name).set(len(self._waiters))
        try:
            await asyncio.wait_for(asyncio.shield(waiter[1]), limit_s)
        except BaseException as e:
            granted = waiter[1].done() and not waiter[1].cancelled()
            if granted:  # admitted in the same instant: give it back
                self._release(amount, 0.0)
            else:
                waiter[1].cancel()
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
                QUEUED.labels(self.name).set(len(self._waiters))
                self._wake()  # a large waiter leaving may let smaller ones behind it in
            if isinstance(e, asyncio.TimeoutError):
                self._shed("timeout", waited_s=time.monotonic() - t0, limit_s=limit_s)
            raise
        WAIT.labels(self.name).observe(time.monotonic() - t0)
        return Permit(self, amount)

    @asynccontextmanager
    async def hold(self, amount: int = 1, *, deadline_s: float | None = None):
        permit = await self.acquire(amount, deadline_s=deadline_s)
        try:
            yield permit
        finally:
            permit.release()

    def _take(self, amount: int) -> None:
        self.used += amount
        self.holders += 1
        IN_USE.labels(self.name).set(self.used)

    def _release(self, amount: int, held_s: float) -> None:
        self.used -= amount
        self.holders -= 1
        if held_s > 0:
            self._hold_s += 0.2 * (held_s - self._hold_s)
            self._released += 1
        IN_USE.labels(self.name).set(self.used)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            amount, fut = self._waiters[0]
            if fut.done():  # left already
                self._waiters.popleft()
                continue
            if self.used + amount > self.capacity:
                break
            self._waiters.popleft()
            self._take(amount)
            fut.set_result(None)
        QUEUED.labels(self.name).set(len(self._waiters))

    def _shed(self, reason: str, waited_s: float | None = None, limit_s: float | None = None):
        SHED.labels(self.name, reason).inc()
        state = f"{self.used} of {self.capacity} {self.unit}, {self.queued} waiting"
        limit_s = self.max_wait_s if limit_s is None else limit_s
        limit = f"the limit is {limit_s:g} s" + ("" if limit_s == self.max_wait_s else ", the request's deadline")
        if reason == "timeout":
            why = f"waited {waited_s:.1f} s ({limit})"
        elif reason == "expected_wait":
            why = f"the wait ahead is about {self.expected_wait_s():.1f} s ({limit})"
        else:
            why = f"its queue is full ({self.max_queue})"
        raise Overloaded(f"{self.describe} is at capacity ({state}) and {why}", retry_after_s=self.retry_after_s(),
                         waited=reason == "timeout")
