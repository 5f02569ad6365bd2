"""Next-token choice for the Transformers engine, with vLLM's sampling semantics.

Per request, in vLLM's order: repetition penalty over every token already in the prompt or
the output (positive logits divided by it, negative ones multiplied), then OpenAI's frequency
and presence penalties over the output's tokens only (minus frequency_penalty per occurrence,
minus presence_penalty once), temperature, top-k,
top-p (the smallest set of most likely tokens whose probability reaches top_p), then a draw
from the request's own generator (seeded when the request gives a seed). Temperature below
1e-5 is greedy (arg-max), as in vLLM.
"""
from __future__ import annotations

import torch

GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS


class RequestSampling:
    """One request's sampling state: its parameters, generator and the tokens seen so far."""

    def __init__(self, params, prompt_ids: list[int], device):
        self.params = params
        self.greedy = params.temperature < GREEDY_BELOW
        self.generator = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.tensor(sorted(set(prompt_ids)), dtype=torch.long, device=device)
        self.counts: dict[int, int] | None = None  # output tokens' occurrences, for the OpenAI penalties
        if getattr(params, "frequency_penalty", 0.0) or getattr(params, "presence_penalty", 0.0):
            self.counts = {}
        self.penalized = self.seen is not None or self.counts is not None

    def observe(self, token: int) -> None:
        if self.seen is not None:
            self.seen = torch.cat([self.seen, torch.tensor([token], device=self.seen.device)])
        if self.counts is not None:
            self.counts[token] = self.counts.get(token, 0) + 1


def _filtered(row: torch.Tensor, s: RequestSampling) -> torch.Tensor:
    p = s.params
    if s.seen is not None:
        vals = row[s.seen]
        row[s.seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if s.counts:
        ids = torch.tensor(list(s.counts), dtype=torch.long, device=row.device)
        n = torch.tensor(list(s.counts.values()), dtype=row.dtype, device=row.device)
        row[ids] -= p.frequency_penalty * n + p.presence_penalty
    if s.greedy:
        return row  # arg-max: temperature, top-k and top-p change nothing
    row = row / p.temperature
    if 0 < p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = row.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= p.top_p  # mass before this token already reaches top_p
        row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return row


def sample(logits: torch.Tensor, states: list[RequestSampling]) -> list[int]:
    """logits (B, V) float32, one state per row -> one token id per row."""
    out = logits.argmax(-1)
    for i, s in enumerate(states):
        if s.greedy and not s.penalized:
            continue
        row = _filtered(logits[i].clone(), s)
        if s.greedy:
            out[i] = row.argmax()
        else:
            out[i] = torch.multinomial(row.softmax(-1), 1, generator=s.generator)[0]
    return out.tolist()
