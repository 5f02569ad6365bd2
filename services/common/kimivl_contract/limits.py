"""Checks on generation options, shared by both tiers.

Each problem is reported with the field's path and the allowed range, so the servers can
return it verbatim. Pure Python on purpose.
"""
from __future__ import annotations

from .errors import Reason, RequestError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_BYTES = 256


def check_sampling(sampling, thinking, prefix: str = "") -> None:
    """Raise RequestError for the first out-of-range field of SamplingParameters /
    ThinkingOptions (either may be a default instance)."""
    p = f"{prefix}sampling."
    if sampling.HasField("temperature") and not 0.0 <= sampling.temperature <= 2.0:
        raise RequestError(f"{p}temperature is {sampling.temperature:g}; allowed range is [0, 2]",
                           field=f"{p}temperature")
    if sampling.HasField("top_p") and not 0.0 < sampling.top_p <= 1.0:
        raise RequestError(f"{p}top_p is {sampling.top_p:g}; allowed range is (0, 1]", field=f"{p}top_p")
    if sampling.HasField("max_tokens") and sampling.max_tokens < 1:
        raise RequestError(f"{p}max_tokens is 0; it must be at least 1 (or unset)", field=f"{p}max_tokens")
    if sampling.HasField("repetition_penalty") and not 0.0 < sampling.repetition_penalty <= 10.0:
        raise RequestError(
            f"{p}repetition_penalty is {sampling.repetition_penalty:g}; allowed range is (0, 10]",
            field=f"{p}repetition_penalty")
    for name in ("frequency_penalty", "presence_penalty"):
        if sampling.HasField(name) and not -2.0 <= getattr(sampling, name) <= 2.0:
            raise RequestError(f"{p}{name} is {getattr(sampling, name):g}; allowed range is [-2, 2]",
                               field=f"{p}{name}")
    if len(sampling.stop) > MAX_STOP_STRINGS:
        raise RequestError(f"{p}stop has {len(sampling.stop)} strings; the limit is {MAX_STOP_STRINGS}",
                           field=f"{p}stop")
    for i, s in enumerate(sampling.stop):
        n = len(s.encode())
        if n == 0 or n > MAX_STOP_STRING_BYTES:
            raise RequestError(f"{p}stop[{i}] is {n} bytes; allowed is 1 to {MAX_STOP_STRING_BYTES}",
                               field=f"{p}stop[{i}]")
    if thinking.HasField("max_thinking_tokens") and thinking.max_thinking_tokens < 1:
        raise RequestError(f"{prefix}thinking.max_thinking_tokens is 0; it must be at least 1 (or unset)",
                           field=f"{prefix}thinking.max_thinking_tokens")


def check_context(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    """prompt + max_tokens (when set) fit the context, and the prompt leaves room to generate."""
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        raise RequestError(f"the prompt ({prompt_tokens} tokens) plus sampling.max_tokens ({max_tokens}) "
                           f"exceeds the context of {max_model_len} tokens", field="sampling.max_tokens",
                           reason=Reason.CONTEXT_EXCEEDED, limit=max_model_len)
    if prompt_tokens >= max_model_len:
        raise RequestError(f"the prompt is {prompt_tokens} tokens; the context is {max_model_len} and at least "
                           "one token must be left to generate", reason=Reason.CONTEXT_EXCEEDED, limit=max_model_len)
