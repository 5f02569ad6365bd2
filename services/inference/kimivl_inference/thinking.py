"""Split Kimi-VL's streamed output into *thinking* and *answer*, as it streams.

Kimi-VL-A3B-Thinking-2506 writes ``◁think▷ … ◁/think▷`` before its answer. In its tokenizer
the markers are several ordinary tokens each, so the split is done on the detokenized text
deltas the engine yields (usually one token per delta; a delta may carry several tokens, or
none when the detokenizer holds back part of a multi-byte character).

:class:`ThinkingSplitter` is fed every delta with :meth:`ThinkingSplitter.feed` and releases
a :class:`Split` (``thinking`` text, ``answer`` text) each time. Pure Python, no imports
beyond the standard library; O(len(delta)) per feed (the held-back text is always shorter
than a marker).

Rules
-----
* **Segments.** Text before ``◁think▷`` and after ``◁/think▷`` is answer; text between is
  thinking. Any number of segments: answer, think, answer, think, answer …
* **Markers never leak.** The markers themselves go to neither field. A marker cut across
  deltas (at any position, even one character per delta) is held back until decided. Only
  the longest suffix of the not-yet-released text that is a *proper prefix of the marker
  that can come next* is held (the start marker while in answer, the end marker while in
  thinking); everything else is released at once, so the split adds no latency beyond a
  possible marker. Text that merely looks like a marker prefix (``◁thin`` then ``x``) is
  released as ordinary text as soon as it stops matching.
* **Stray markers are text.** Only the marker that can come next is recognised: an end
  marker while in answer is kept verbatim as answer text, and a start marker inside
  thinking is kept verbatim as thinking text. (Treating text before a stray end marker as
  thinking would mean holding back the whole answer; the streaming split doesn't guess.)
* **No stripping.** Concatenated ``thinking`` deltas plus concatenated ``answer`` deltas
  are exactly the original text minus the recognised markers; whitespace is untouched.
  The model usually writes newlines right after ``◁/think▷``: clients may strip leading
  newlines/whitespace of the answer (``kimivl.thinking`` does, for finished text).
* **End of stream.** :meth:`ThinkingSplitter.finish` releases whatever is held back: a
  partial marker that never completed is ordinary text of the current segment.
  :attr:`ThinkingSplitter.ended_in_thinking` then tells whether the stream ended inside an
  unclosed thinking segment (e.g. the model hit ``max_tokens`` while thinking).
* **Thinking budget.** When the server injects the end marker itself (the thinking budget
  is spent) it calls :meth:`ThinkingSplitter.force_close`: held-back text is released as
  thinking, the splitter switches to answer and records ``budget_closed = True``.

Token attribution
-----------------
Each delta's ``num_tokens`` are attributed once its text is *decided*:

* a delta's tokens count as **thinking** if, where the delta's text ends, the splitter is
  inside thinking, or the delta contained/completed a marker transition into or out of
  thinking (so a marker's tokens count as thinking); otherwise as **answer**;
* a delta whose text was entirely held back (it released nothing, crossed no marker and
  left a possible marker prefix pending) is not yet decided: its tokens are carried
  (:attr:`ThinkingSplitter.held_tokens`) and attributed together with the next delta that
  decides them, so all tokens of an opening marker ``◁`` ``think`` ``▷`` count as thinking,
  while ``◁thin`` followed by ``x`` counts as answer. :meth:`finish` and
  :meth:`force_close` attribute carried tokens to the segment the held text is released to.

At every moment ``thinking_tokens + answer_tokens + held_tokens`` equals the tokens fed;
after :meth:`finish` ``held_tokens`` is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["THINK_START", "THINK_END", "Split", "ThinkingSplitter"]

THINK_START = "◁think▷"
THINK_END = "◁/think▷"


@dataclass
class Split:
    """What one :meth:`ThinkingSplitter.feed` (or ``finish``/``force_close``) releases."""

    thinking: str = ""
    answer: str = ""

    def __bool__(self) -> bool:
        return bool(self.thinking or self.answer)


def _held_suffix_len(text: str, pos: int, marker: str) -> int:
    """Length of the longest suffix of ``text[pos:]`` that is a proper prefix of ``marker``."""
    n = len(text)
    first = marker[0]
    i = text.find(first, max(pos, n - len(marker) + 1))
    while i != -1:
        # text[i:] is shorter than marker here, so a match is a proper prefix.
        if marker.startswith(text[i:]):
            return n - i
        i = text.find(first, i + 1)
    return 0


class ThinkingSplitter:
    """Streaming splitter of thinking and answer text; see the module docstring for the rules."""

    __slots__ = (
        "start",
        "end",
        "in_thinking",
        "thinking_tokens",
        "answer_tokens",
        "thinking_segments",
        "budget_closed",
        "_held",
        "_held_tokens",
        "_finished",
    )

    def __init__(self, start: str = THINK_START, end: str = THINK_END):
        if not start or not end:
            raise ValueError("thinking markers must be non-empty")
        if start == end:
            raise ValueError("the start and end markers must differ")
        self.start = start
        self.end = end
        self.in_thinking = False
        self.thinking_tokens = 0
        self.answer_tokens = 0
        self.thinking_segments = 0
        self.budget_closed = False
        self._held = ""  # not-yet-released text: a proper prefix of the next marker
        self._held_tokens = 0  # tokens of deltas whose text is entirely held back
        self._finished = False

    # -- read-only views ---------------------------------------------------------------------
    @property
    def ended_in_thinking(self) -> bool:
        """The stream ended inside an unclosed thinking segment (meaningful after finish())."""
        return self.in_thinking

    @property
    def held_text(self) -> str:
        """Text held back because it may be the start of the next marker."""
        return self._held

    @property
    def held_tokens(self) -> int:
        """Tokens fed but not yet attributed (their text is entirely held back)."""
        return self._held_tokens

    @property
    def finished(self) -> bool:
        return self._finished

    # -- streaming ---------------------------------------------------------------------------
    def feed(self, text: str, num_tokens: int = 1) -> Split:
        """Feed one engine text delta carrying ``num_tokens`` generated tokens."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if num_tokens < 0:
            raise ValueError("num_tokens must be >= 0")

        held = self._held
        # Fast path: nothing held and no character that could start the next marker.
        if not held and (self.end[0] if self.in_thinking else self.start[0]) not in text:
            self._attribute(num_tokens + self._held_tokens, False)
            self._held_tokens = 0
            return Split(text, "") if self.in_thinking else Split("", text)

        buf = held + text if held else text
        thinking: list[str] = []
        answer: list[str] = []
        transition = False
        pos = 0
        while True:
            marker = self.end if self.in_thinking else self.start
            i = buf.find(marker, pos)
            if i < 0:
                break
            if i > pos:
                (thinking if self.in_thinking else answer).append(buf[pos:i])
            pos = i + len(marker)
            self.in_thinking = not self.in_thinking
            if self.in_thinking:
                self.thinking_segments += 1
            transition = True

        keep = _held_suffix_len(buf, pos, marker)
        stop = len(buf) - keep
        if stop > pos:
            (thinking if self.in_thinking else answer).append(buf[pos:stop])
        self._held = buf[stop:]

        if not transition and not thinking and not answer and self._held:
            # Everything this delta brought is still undecided: carry its tokens.
            self._held_tokens += num_tokens
        else:
            self._attribute(num_tokens + self._held_tokens, transition)
            self._held_tokens = 0
        return Split("".join(thinking), "".join(answer))

    def finish(self) -> Split:
        """End of stream: release held-back text as ordinary text of the current segment."""
        if self._finished:
            return Split()
        self._finished = True
        return self._flush()

    def force_close(self) -> Split:
        """The server injected the end marker (thinking budget spent).

        Releases held-back text as thinking, switches to answer and sets ``budget_closed``.
        A no-op (returns an empty Split, ``budget_closed`` unchanged) when not in thinking.
        """
        if self._finished:
            raise RuntimeError("force_close() after finish()")
        if not self.in_thinking:
            return Split()
        out = self._flush()
        self.in_thinking = False
        self.budget_closed = True
        return out

    # -- internals ---------------------------------------------------------------------------
    def _attribute(self, tokens: int, transition: bool) -> None:
        if transition or self.in_thinking:
            self.thinking_tokens += tokens
        else:
            self.answer_tokens += tokens

    def _flush(self) -> Split:
        held, self._held = self._held, ""
        self._attribute(self._held_tokens, False)
        self._held_tokens = 0
        return Split(held, "") if self.in_thinking else Split("", held)

    def __repr__(self) -> str:
        return (
            f"ThinkingSplitter(in_thinking={self.in_thinking}, segments={self.thinking_segments}, "
            f"thinking_tokens={self.thinking_tokens}, answer_tokens={self.answer_tokens}, "
            f"held={self._held!r}, budget_closed={self.budget_closed})"
        )
