"""One generation: engine output streamed as thinking/answer deltas, then a result.

The thinking budget lives here: when a request has spent its thinking tokens while still
inside a thinking segment, its engine request is aborted and a continuation is started
with the end marker's token ids appended (prompt + generated + ``◁/think▷``), so the
model goes on to answer. The markers are several ordinary tokens in Kimi-VL's tokenizer,
which is why vLLM's own reasoning budget can't do this. The prefix cache makes the
continuation's prefill cheap.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from kimivl.v1 import inference_pb2, types_pb2

from .thinking import THINK_END, ThinkingSplitter

DEFAULT_TEMPERATURE = 0.8  # the model card's recommendation for the Thinking model
DEFAULT_TOP_P = 0.9
_FINISH = {"stop": types_pb2.FINISH_REASON_STOP, "length": types_pb2.FINISH_REASON_LENGTH,
           "abort": types_pb2.FINISH_REASON_ABORT}


@dataclass
class GenerationStats:
    """Observed by the server for metrics."""
    first_token_s: float | None = None
    token_times: list[float] = field(default_factory=list)


def sampling_params(sampling, max_tokens: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        temperature=sampling.temperature if sampling.HasField("temperature") else DEFAULT_TEMPERATURE,
        top_p=sampling.top_p if sampling.HasField("top_p") else DEFAULT_TOP_P,
        top_k=sampling.top_k if sampling.HasField("top_k") else 0,
        seed=sampling.seed if sampling.HasField("seed") else None,
        repetition_penalty=sampling.repetition_penalty if sampling.HasField("repetition_penalty") else 1.0,
        frequency_penalty=sampling.frequency_penalty if sampling.HasField("frequency_penalty") else 0.0,
        presence_penalty=sampling.presence_penalty if sampling.HasField("presence_penalty") else 0.0,
        stop=list(sampling.stop) or None,
        ignore_eos=sampling.ignore_eos,
        max_tokens=max_tokens,
        output_kind=RequestOutputKind.DELTA,
        skip_special_tokens=True,
    )


async def generate(engine, engine_input, request, *, max_model_len: int, end_marker_ids: list[int],
                   image_tokens: int, stats: GenerationStats,
                   arrived_s: float | None = None, trace_headers: dict | None = None) -> AsyncIterator[inference_pb2.GenerateResponse]:
    """Yield GenerateResponse messages: deltas, then one result. Timings count from
    ``arrived_s`` (``time.perf_counter()`` at the request's arrival; now if None)."""
    t0 = time.perf_counter() if arrived_s is None else arrived_s
    prompt_len = len(request.prompt.token_ids)
    sampling, thinking = request.sampling, request.thinking
    max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else max_model_len - prompt_len
    budget = thinking.max_thinking_tokens if thinking.HasField("max_thinking_tokens") else None
    show_thinking = not thinking.exclude_thinking
    splitter = ThinkingSplitter()
    generated: list[int] = []
    cached = None
    finish = None
    rid = request.request_id
    unsent_ids: list[int] = []  # token ids of deltas not sent (hidden thinking)
    current_input = engine_input
    attempt = 0

    while True:
        params = sampling_params(sampling, max_tokens - len(generated))
        budget_hit = False
        # aclosing: leaving the loop early must close the engine's generator now (which
        # aborts the engine request), not whenever it is garbage-collected.
        stream = engine.generate(current_input, params, f"{rid}-{attempt}" if attempt else rid,
                                 **({"trace_headers": trace_headers} if trace_headers else {}))
        async with aclosing(stream):
            async for out in stream:
                if cached is None:
                    cached = out.num_cached_tokens or 0
                o = out.outputs[0]
                now = time.perf_counter()
                if o.token_ids:
                    if stats.first_token_s is None:
                        stats.first_token_s = now - t0
                    stats.token_times.append(now)
                    generated.extend(o.token_ids)
                split = splitter.feed(o.text, len(o.token_ids))
                unsent_ids.extend(o.token_ids)
                if split.answer or (show_thinking and split.thinking):
                    yield _delta(split, unsent_ids, show_thinking)
                    unsent_ids = []
                if o.finish_reason is not None:
                    finish = o.finish_reason
                elif (budget is not None and splitter.in_thinking and splitter.thinking_tokens >= budget
                      and len(generated) + len(end_marker_ids) < max_tokens):
                    budget_hit = True
                    break  # leaving the generator aborts the engine request
        if not budget_hit:
            break
        # Close the thinking ourselves and let the model answer.
        split = splitter.force_close()
        splitter.thinking_tokens += len(end_marker_ids)
        generated.extend(end_marker_ids)
        unsent_ids.extend(end_marker_ids)
        if show_thinking and split.thinking:
            yield _delta(split, unsent_ids, show_thinking)
            unsent_ids = []
        current_input = _continuation(engine_input, list(request.prompt.token_ids) + generated)
        attempt += 1

    tail = splitter.finish()
    if tail.answer or (show_thinking and tail.thinking) or unsent_ids:
        yield _delta(tail, unsent_ids, show_thinking)
    total_s = time.perf_counter() - t0
    times = stats.token_times
    itl_ms = (times[-1] - times[0]) / (len(times) - 1) * 1e3 if len(times) > 1 else 0.0
    yield inference_pb2.GenerateResponse(result=types_pb2.GenerationResult(
        finish_reason=_FINISH.get(finish, types_pb2.FINISH_REASON_UNSPECIFIED),
        ended_in_thinking=splitter.ended_in_thinking,
        thinking_budget_reached=splitter.budget_closed,
        usage=types_pb2.Usage(prompt_tokens=prompt_len, cached_prompt_tokens=cached or 0,
                              image_tokens=image_tokens, thinking_tokens=splitter.thinking_tokens,
                              answer_tokens=splitter.answer_tokens),
        timings=types_pb2.Timings(
            time_to_first_token_ms=(stats.first_token_s or total_s) * 1e3, total_ms=total_s * 1e3,
            mean_inter_token_ms=itl_ms),
    ))


def _delta(split, token_ids, show_thinking: bool) -> inference_pb2.GenerateResponse:
    return inference_pb2.GenerateResponse(delta=types_pb2.GenerationDelta(
        thinking=split.thinking if show_thinking else "", answer=split.answer, token_ids=token_ids))


def _continuation(engine_input, token_ids: list[int]):
    """The same request with more tokens: images and their placeholders are unchanged
    (they sit in the original prompt, which is a prefix)."""
    new = dict(engine_input)
    new["prompt_token_ids"] = token_ids
    return new


def end_marker_token_ids(tokenizer) -> list[int]:
    return list(tokenizer.encode(THINK_END, add_special_tokens=False))
