"""Split a *finished* Kimi-VL output into thinking and answer (client side, pure Python).

Kimi-VL-A3B-Thinking-2506 writes ``◁think▷ … ◁/think▷`` before its answer. The server
already streams ``thinking`` and ``answer`` apart; these helpers are for raw text (e.g. from
another serving stack, logs, or the model card's recipe).

* :func:`extract_thinking_and_summary` — drop-in for the seed's helper of the same name,
  returns ``(thinking, summary)``.
* :func:`split_thinking` — richer: :class:`ThinkingResult` with every segment and whether
  the last thinking segment was left unclosed.

Both are built on one parsing routine, :func:`_parse`.

Parsing rules
-------------
* Text between ``bot`` and the next ``eot`` is a thinking segment; everything else is
  answer. Segments are stripped; ``thinking`` is the non-empty segments joined with
  ``"\\n\\n"``; ``answer`` is the non-empty stripped answer pieces joined with ``"\\n\\n"``.
* If the *first* marker in the text is ``eot`` (no ``bot`` before it), the text from the
  start up to it is a thinking segment: the model (or the chat template) omitted the
  opening marker.
* Otherwise only the marker that can come next is recognised: a ``bot`` inside thinking is
  thinking text, a later stray ``eot`` in answer is answer text (as in the server's
  streaming splitter).
* A ``bot`` with no ``eot`` after it opens an unclosed segment: everything after it is
  thinking (``unclosed=True``).
* Text with no marker at all is returned unchanged as the answer (not stripped).

Differences from the seed's helper
----------------------------------
The seed's version::

    def extract_thinking_and_summary(text, bot="◁think▷", eot="◁/think▷"):
        if bot in text and eot not in text:
            return "", text
        if eot in text:
            thinking = text[text.index(bot) + len(bot):text.index(eot)].strip()
            summary = text[text.index(eot) + len(eot):].strip()
            return thinking, summary
        return "", text

gives the same result as ours for text with no marker and for every single-segment,
well-formed text ``[whitespace] bot … eot … answer`` (no further markers). It differs on:

1. **Unclosed thinking** (``bot`` without ``eot``, e.g. the model hit ``max_tokens`` while
   thinking): the seed returns ``("", text)`` — the raw thinking, marker included, is
   presented as the answer. Ours returns ``(text after bot, stripped, "")``: it *is*
   thinking, and there is no answer yet (plus any answer text before ``bot``).
2. **``eot`` without ``bot``**: the seed raises ``ValueError`` (``text.index(bot)``). Ours
   treats everything before the first ``eot`` as thinking (the opening marker was omitted).
3. **``eot`` before the first ``bot``** (``a eot b bot c eot d``): the seed slices with the
   wrong indices and returns ``("", "b bot c eot d")``. Ours: thinking ``a`` and ``c``,
   answer ``b`` and ``d``.
4. **Several thinking segments**: the seed keeps only the first and leaves the later
   markers and thinking inside the summary. Ours joins all thinking segments with
   ``"\\n\\n"`` and the answer pieces likewise, with no markers left.
5. **Answer text before the first ``bot``**: the seed silently drops it; ours keeps it as
   answer (whitespace-only text before ``bot`` is dropped by both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["THINK_START", "THINK_END", "ThinkingResult", "extract_thinking_and_summary", "split_thinking"]

THINK_START = "◁think▷"
THINK_END = "◁/think▷"


@dataclass(frozen=True)
class ThinkingResult:
    thinking: str  # non-empty stripped segments joined with "\n\n"
    answer: str  # non-empty stripped answer pieces joined with "\n\n" (text unchanged if no marker)
    segments: list[str] = field(default_factory=list)  # every thinking segment, stripped, in order
    unclosed: bool = False  # the text ended inside a thinking segment


def _parse(text: str, bot: str, eot: str) -> tuple[list[str], list[str], bool]:
    """Raw (unstripped) thinking segments, raw answer pieces, and whether thinking is unclosed.

    Returns ``([], [text], False)`` when the text holds neither marker.
    """
    if not bot or not eot or bot == eot:
        raise ValueError("bot and eot must be non-empty and differ")
    thinking: list[str] = []
    answer: list[str] = []
    pos = 0
    first_bot = text.find(bot)
    first_eot = text.find(eot)
    if first_eot != -1 and (first_bot == -1 or first_eot < first_bot):
        # The opening marker was omitted: the text up to the first eot is thinking.
        thinking.append(text[:first_eot])
        pos = first_eot + len(eot)
    in_thinking = False
    while True:
        if in_thinking:
            i = text.find(eot, pos)
            if i == -1:
                thinking.append(text[pos:])
                return thinking, answer, True
            thinking.append(text[pos:i])
            pos = i + len(eot)
            in_thinking = False
        else:
            i = text.find(bot, pos)
            if i == -1:
                answer.append(text[pos:])
                return thinking, answer, False
            answer.append(text[pos:i])
            pos = i + len(bot)
            in_thinking = True


def split_thinking(text: str, bot: str = THINK_START, eot: str = THINK_END) -> ThinkingResult:
    """Split finished text into every thinking segment and the answer (see module docstring)."""
    raw_thinking, raw_answer, unclosed = _parse(text, bot, eot)
    if not raw_thinking:
        # No marker at all: the text is the answer, unchanged (as the seed returns it).
        return ThinkingResult(thinking="", answer=text, segments=[], unclosed=False)
    segments = [s.strip() for s in raw_thinking]
    answer = "\n\n".join(p for p in (a.strip() for a in raw_answer) if p)
    return ThinkingResult(
        thinking="\n\n".join(s for s in segments if s),
        answer=answer,
        segments=segments,
        unclosed=unclosed,
    )


def extract_thinking_and_summary(text: str, bot: str = THINK_START, eot: str = THINK_END) -> tuple[str, str]:
    """``(thinking, summary)``; seed-compatible on well-formed single-segment text."""
    result = split_thinking(text, bot, eot)
    return result.thinking, result.answer
