"""The front door's admission budgets and per-request limits, with defaults from the machine.

Two budgets (:class:`~kimivl_hosting.budget.Budget`) guard what preparing a request costs:

* ``requests``: requests being prepared at once (fetching, tokenizing, decoding), default four
  per CPU; more wait in a queue (default 16 per CPU, each at most ``--max-queue-wait-s``), and
  past that are refused at once with UNAVAILABLE and a retry hint;
* ``decode``: memory held by images being decoded and processed (each image's
  :func:`~kimivl_preprocess.image.memory_estimate`, known from its header), default a quarter
  of the memory this process may use (its cgroup limit in a container).

A request passes the first on arrival, after its cheap checks (counts, text size); each image
passes the second once its header is read, before it is decoded. The requests' own limits
(text characters, pixels and tensor bytes per request) refuse what no budget should ever admit.
"""
from __future__ import annotations

from dataclasses import dataclass

from kimivl_hosting import machine
from kimivl_hosting.budget import Budget

CHARS_PER_TOKEN = 8  # text longer than this many characters per token of the context cannot fit
MiB = 1 << 20


@dataclass
class FrontDoorBudgets:
    requests: Budget
    decode: Budget

    @classmethod
    def unlimited(cls) -> FrontDoorBudgets:
        return cls(Budget("preprocess_requests", 0, max_queue=0, max_wait_s=0, describe="the front door",
                          unit="requests preparing"),
                   Budget("preprocess_decode", 0, max_queue=0, max_wait_s=0, describe="the front door's image memory",
                          unit="bytes decoding"))

    @classmethod
    def from_options(cls, *, max_preparing: int = 0, max_queued: int = -1, max_queue_wait_s: float = 10.0,
                     max_decode_mb: int = 0, largest_image_bytes: int = 0,
                     max_images: int = 256) -> FrontDoorBudgets:
        """0 (or -1 for the queue) = the default from this machine; the decode budget is at least one
        largest image, so every image the limits allow can be admitted."""
        cpus = machine.cpu_count()
        preparing = max_preparing or 4 * cpus
        queued = max_queued if max_queued >= 0 else 16 * cpus
        decode = max_decode_mb * MiB if max_decode_mb else machine.memory_bytes() // 4
        decode = max(decode, largest_image_bytes)
        return cls(Budget("preprocess_requests", preparing, max_queue=queued, max_wait_s=max_queue_wait_s,
                          describe="the front door", unit="requests preparing"),
                   Budget("preprocess_decode", decode, max_queue=preparing * max(1, max_images),  # bounded by ``requests``
                          max_wait_s=max_queue_wait_s, describe="the front door's image memory",
                          unit="bytes decoding"))
