"""The generation loop's thinking logic, driven by a scripted engine.

The tiny random model never writes ◁think▷ of its own accord, so the budget and the
split are exercised here with an engine double that replays text deltas the way vLLM's
AsyncLLM does (DELTA outputs, one token a step, abort on leaving the generator); the
real engine is exercised by the end-to-end tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kimivl.v1 import inference_pb2, types_pb2
from kimivl_inference.generation import GenerationStats, generate

END_IDS = [901, 902, 903]  # "◁/think▷" as three ordinary tokens


@dataclass
class Out:
    text: str
    token_ids: list
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    outputs: list
    num_cached_tokens: int = 0


@dataclass
class ScriptedEngine:
    """Emits `script` (list of text pieces, one token each) for a fresh request; for a
    continuation (prompt ends with END_IDS) emits `answer_script`."""
    script: list
    answer_script: list
    calls: list = field(default_factory=list)
    aborted: list = field(default_factory=list)

    async def generate(self, engine_input, params, request_id):
        self.calls.append((list(engine_input["prompt_token_ids"]), params.max_tokens, request_id))
        cont = engine_input["prompt_token_ids"][-3:] == END_IDS
        pieces = self.answer_script if cont else self.script
        n = 0
        try:
            for i, piece in enumerate(pieces):
                n += 1
                last = i == len(pieces) - 1 or n == params.max_tokens
                yield RequestOutput([Out(piece, [100 + i], "length" if last else None)], num_cached_tokens=5)
                if last:
                    return
        finally:
            if n < min(len(pieces), params.max_tokens):
                self.aborted.append(request_id)


def request(max_tokens=50, budget=None, exclude=False):
    r = inference_pb2.GenerateRequest(prompt=types_pb2.PreparedPrompt(token_ids=[1, 2, 3]), request_id="r")
    r.sampling.max_tokens = max_tokens
    r.thinking.exclude_thinking = exclude
    if budget is not None:
        r.thinking.max_thinking_tokens = budget
    return r


async def run(engine, req):
    msgs = [m async for m in generate(engine, {"prompt_token_ids": [1, 2, 3]}, req, max_model_len=1000,
                                      end_marker_ids=END_IDS, image_tokens=0, stats=GenerationStats())]
    deltas = [m.delta for m in msgs[:-1]]
    return "".join(d.thinking for d in deltas), "".join(d.answer for d in deltas), \
        [t for d in deltas for t in d.token_ids], msgs[-1].result


THINKING = ["◁", "think", "▷", "Let", " me", " see", ".", " More", " thought", ".", "◁/", "think", "▷",
            "It", " is", " red", "."]


async def test_split_and_counts_with_markers_cut_into_tokens():
    thinking, answer, ids, result = await run(ScriptedEngine(THINKING, []), request())
    assert thinking == "Let me see. More thought."
    assert answer == "It is red."
    assert result.usage.thinking_tokens == 13 and result.usage.answer_tokens == 4
    assert len(ids) == len(THINKING)
    assert not result.ended_in_thinking and not result.thinking_budget_reached


async def test_thinking_budget_closes_the_segment_and_the_model_answers():
    engine = ScriptedEngine(THINKING[:3] + [" step"] * 40, ["Answer", " now", "."])
    thinking, answer, ids, result = await run(engine, request(max_tokens=50, budget=8))
    assert result.thinking_budget_reached and not result.ended_in_thinking
    assert thinking == " step" * 5  # 3 marker tokens + 5 thinking tokens = the budget of 8
    assert answer == "Answer now."
    assert engine.aborted == ["r"]  # the first engine request was aborted, not left running
    (p1, m1, r1), (p2, m2, r2) = engine.calls
    assert p2 == [1, 2, 3] + [100 + i for i in range(8)] + END_IDS  # prompt + generated + end marker
    assert m2 == 50 - 8 - 3 and r2 == "r-1"
    assert ids[-3:] == [100, 101, 102] and END_IDS == ids[8:11]
    assert result.usage.thinking_tokens == 8 + 3 and result.usage.answer_tokens == 3


async def test_length_limit_inside_thinking_is_reported():
    _, answer, _, result = await run(ScriptedEngine(THINKING[:3] + [" hmm"] * 10, []), request(max_tokens=8))
    assert result.ended_in_thinking and answer == ""
    assert result.finish_reason == types_pb2.FINISH_REASON_LENGTH


async def test_hidden_thinking_still_counts_and_carries_every_token_id():
    thinking, answer, ids, result = await run(ScriptedEngine(THINKING, []), request(exclude=True))
    assert thinking == "" and answer == "It is red."
    assert ids == [100 + i for i in range(len(THINKING))]
    assert result.usage.thinking_tokens == 13
