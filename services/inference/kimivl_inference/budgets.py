"""The inference tier's admission budgets, decided before any tensor work and before the
response headers (so a refused request is retried by the front door on another replica).

* ``tensors``: bytes of image tensors the tier holds (as received, plus the engine's copy
  in the model's dtype), from admission to the end of the request; default a quarter of the
  memory this process may use. The bytes are in memory already when a request arrives, so
  waiting would save nothing: past the budget a request is refused at once.
* ``waiting``: requests admitted and not yet streaming (their first token not out), default
  twice the engine's ``max_num_seqs``: more could only wait in vLLM's queue while their
  TTFT grows. More wait here, up to ``--max-queued`` for up to ``--max-queue-wait-s``, and are
  then refused with UNAVAILABLE and a retry hint.
"""
from __future__ import annotations

from dataclasses import dataclass

from kimivl_contract import dtypes
from kimivl_contract.prepared import CHANNELS, PATCH
from kimivl_hosting import machine
from kimivl_hosting.budget import Budget

MiB = 1 << 20


@dataclass
class InferenceBudgets:
    waiting: Budget
    tensors: Budget

    @classmethod
    def from_options(cls, *, max_num_seqs: int, max_waiting: int = 0, max_queued: int = -1,
                     max_queue_wait_s: float = 10.0, max_tensor_mb: int = 0) -> InferenceBudgets:
        waiting = max_waiting or 2 * max(1, max_num_seqs)
        queued = max_queued if max_queued >= 0 else waiting
        tensor_bytes = max_tensor_mb * MiB if max_tensor_mb else machine.memory_bytes() // 4
        return cls(Budget("inference_waiting", waiting, max_queue=queued, max_wait_s=max_queue_wait_s,
                          describe="this inference replica", unit="requests waiting for their first token"),
                   Budget("inference_tensors", tensor_bytes, max_queue=0, max_wait_s=0,
                          describe="this inference replica's tensor memory", unit="bytes"))


def tensor_bytes(prompt, model_itemsize: int = 2) -> int:
    """Bytes a prompt's images will hold here, from their declared shapes (nothing read yet):
    the tensors as received plus the engine's copy in the model's dtype."""
    total = 0
    for img in prompt.images:
        n = img.grid_height * img.grid_width * CHANNELS * PATCH * PATCH
        wire = dtypes.BY_PROTO.get(img.pixel_values.dtype)
        total += n * ((wire.itemsize if wire else 4) + model_itemsize)
    return total
