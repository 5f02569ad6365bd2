"""Prefill grouping: hand image requests to the engine together while it is busy.

Every vLLM step that prefills images stalls all running streams for a fixed part plus a part
per image; on an H200 with the full-size model ~69 ms + ~57 ms per 1–2 MP image, whichever
server fed the engine (docs/benchmarks.md, "One engine property"). Prefills that arrive one
at a time each pay the fixed part; a server whose requests reach the engine in bunches
(`vllm serve` behind its API servers, by accident) gets more through past capacity and keeps
decode streams faster, at the price of TTFT.

With a window of W ms, an image request that arrives while the engine has work opens a group
(or joins the open one); the group goes to the engine when W ms have passed since it opened
or when its prompts fill one engine step (max_num_batched_tokens). An idle engine takes a
request at once, so idle latency is unchanged. Off by default: the window that pays is a
measurement still to make on the GPU.
"""
from __future__ import annotations

import asyncio
import time


class _Group:
    __slots__ = ("released", "tokens")

    def __init__(self):
        self.released = asyncio.Event()
        self.tokens = 0


class PrefillGrouper:
    def __init__(self, window_s: float, step_tokens: int):
        self.window_s = window_s
        self.step_tokens = step_tokens
        self._open: _Group | None = None

    @property
    def enabled(self) -> bool:
        return self.window_s > 0

    async def admit(self, prompt_tokens: int, engine_busy: bool) -> float:
        """Wait for this request's group to be released; the seconds held (0 when not held)."""
        if not self.enabled or not engine_busy:
            return 0.0
        t0 = time.perf_counter()
        group = self._open
        if group is None:
            group = self._open = _Group()
            asyncio.get_running_loop().call_later(self.window_s, self._release, group)
        group.tokens += prompt_tokens
        if group.tokens >= self.step_tokens:  # one step can take no more: waiting gains nothing
            self._release(group)
        await group.released.wait()
        return time.perf_counter() - t0

    def _release(self, group: _Group) -> None:
        if self._open is group:
            self._open = None
        group.released.set()
