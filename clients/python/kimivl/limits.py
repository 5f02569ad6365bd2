"""Checks on generation options, shared by both tiers (and usable by clients).

Each problem is reported with the field's path and the allowed range, so the servers can
return it verbatim as an INVALID_ARGUMENT message. Pure Python on purpose: the client
package carries it without any server dependency.
"""
from __future__ import annotations

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_BYTES = 256


class RequestError(ValueError):
    """A request field is out of range. ``resource_exhausted`` marks size limits."""

    def __init__(self, message: str, *, resource_exhausted: bool = False):
        super().__init__(message)
        self.resource_exhausted = resource_exhausted


def check_sampling(sampling, thinking, prefix: str = "") -> None:
    """Raise RequestError for the first out-of-range field of SamplingParameters /
    ThinkingOptions (either may be a default instance)."""
    p = f"{prefix}sampling."
    if sampling.HasField("temperature") and not 0.0 <= sampling.temperature <= 2.0:
        raise RequestError(f"{p}temperature is {sampling.temperature:g}; allowed range is [0, 2]")
    if sampling.HasField("top_p") and not 0.0 < sampling.top_p <= 1.0:
        raise RequestError(f"{p}top_p is {sampling.top_p:g}; allowed range is (0, 1]")
    if sampling.HasField("max_tokens") and sampling.max_tokens < 1:
        raise RequestError(f"{p}max_tokens is 0; it must be at least 1 (or unset)")
    if sampling.HasField("repetition_penalty") and not 0.0 < sampling.repetition_penalty <= 10.0:
        raise RequestError(
            f"{p}repetition_penalty is {sampling.repetition_penalty:g}; allowed range is (0, 10]")
    if len(sampling.stop) > MAX_STOP_STRINGS:
        raise RequestError(f"{p}stop has {len(sampling.stop)} strings; the limit is {MAX_STOP_STRINGS}")
    for i, s in enumerate(sampling.stop):
        n = len(s.encode())
        if n == 0 or n > MAX_STOP_STRING_BYTES:
            raise RequestError(f"{p}stop[{i}] is {n} bytes; allowed is 1 to {MAX_STOP_STRING_BYTES}")
    if thinking.HasField("max_thinking_tokens") and thinking.max_thinking_tokens < 1:
        raise RequestError(f"{prefix}thinking.max_thinking_tokens is 0; it must be at least 1 (or unset)")
