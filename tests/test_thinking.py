"""Thinking/answer split: the server's streaming splitter and the client's finished-text helper."""

from __future__ import annotations

import random

import pytest

from kimivl.thinking import ThinkingResult, extract_thinking_and_summary, split_thinking
from kimivl_inference.thinking import THINK_END, THINK_START, Split, ThinkingSplitter

S, E = THINK_START, THINK_END

# -- reference content ---------------------------------------------------------------------------
# Two thinking segments between three answer pieces. The content deliberately holds things that
# look like marker prefixes ("◁", "◁thin", "◁/thi", "◁/", "think▷", "▷") but never a full marker.
ANSWER_PIECES = [
    "Intro ◁ text ◁thin but not a marker ",
    "\n\nMiddle answer with ◁/thi and ▷ and think▷ ",
    "\n\nFinal answer: 42 ◁",  # ends with a lone marker-first character
]
THINKING_PIECES = [
    "First thought ◁/ half ◁thi and ◁/think without end\n",
    "Second ◁ thought ▷ ◁/thin\n",
]
FULL = "".join(
    [ANSWER_PIECES[0], S, THINKING_PIECES[0], E, ANSWER_PIECES[1], S, THINKING_PIECES[1], E, ANSWER_PIECES[2]]
)
EXPECTED_THINKING = "".join(THINKING_PIECES)
EXPECTED_ANSWER = "".join(ANSWER_PIECES)


def _oracle(prefix: str, start: str = S, end: str = E) -> tuple[str, str, str, bool]:
    """Character-level reference: (released thinking, released answer, held, in_thinking)."""
    thinking: list[str] = []
    answer: list[str] = []
    in_thinking = False
    seg_start = 0  # index in `prefix` where the current segment's text begins
    i = 0
    while i < len(prefix):
        marker = end if in_thinking else start
        if prefix.startswith(marker, i):
            in_thinking = not in_thinking
            i += len(marker)
            seg_start = i
            continue
        (thinking if in_thinking else answer).append(prefix[i])
        i += 1
    marker = end if in_thinking else start
    seg = prefix[seg_start:]
    held = ""
    for k in range(min(len(seg), len(marker) - 1), 0, -1):
        if seg.endswith(marker[:k]):
            held = marker[:k]
            break
    t, a = "".join(thinking), "".join(answer)
    if held:
        if in_thinking:
            t = t[: -len(held)]
        else:
            a = a[: -len(held)]
    return t, a, held, in_thinking


def _run(chunks: list[str], splitter: ThinkingSplitter | None = None) -> tuple[str, str, ThinkingSplitter]:
    """Feed chunks; after every feed check against the oracle (no leak, no drop, no latency)."""
    sp = splitter or ThinkingSplitter()
    thinking, answer = [], []
    fed = ""
    for chunk in chunks:
        out = sp.feed(chunk)
        assert isinstance(out, Split)
        thinking.append(out.thinking)
        answer.append(out.answer)
        fed += chunk
        exp_t, exp_a, exp_held, exp_in = _oracle(fed)
        assert "".join(thinking) == exp_t, (chunks, fed)
        assert "".join(answer) == exp_a, (chunks, fed)
        assert sp.held_text == exp_held
        assert sp.in_thinking == exp_in
        assert len(sp.held_text) < max(len(S), len(E))
    out = sp.finish()
    thinking.append(out.thinking)
    answer.append(out.answer)
    return "".join(thinking), "".join(answer), sp


def _assert_full_result(thinking: str, answer: str, sp: ThinkingSplitter) -> None:
    assert thinking == EXPECTED_THINKING
    assert answer == EXPECTED_ANSWER
    for field_text in (thinking, answer):
        assert S not in field_text and E not in field_text
    assert sp.thinking_segments == 2
    assert not sp.ended_in_thinking
    assert sp.held_text == "" and sp.held_tokens == 0


def test_oracle_sanity():
    t, a, held, in_thinking = _oracle(FULL)
    assert (t, a, held, in_thinking) == (EXPECTED_THINKING, EXPECTED_ANSWER[:-1], "◁", False)


def test_single_delta():
    _assert_full_result(*_run([FULL]))


@pytest.mark.parametrize("cut", range(len(FULL) + 1))
def test_every_two_delta_cut(cut):
    _assert_full_result(*_run([FULL[:cut], FULL[cut:]]))


def test_one_char_per_delta():
    _assert_full_result(*_run(list(FULL)))


def test_random_chunkings():
    rng = random.Random(1234)
    for _ in range(300):
        chunks, i = [], 0
        while i < len(FULL):
            n = rng.choice([0, 1, 1, 1, 2, 3, 5, 8, 13])
            chunks.append(FULL[i : i + n])
            i += n
        _assert_full_result(*_run(chunks))


def test_every_three_delta_cut_around_markers():
    # Two cuts inside/around every marker occurrence.
    spans = []
    for m in (S, E):
        idx = FULL.find(m)
        while idx != -1:
            spans.append((idx - 2, idx + len(m) + 2))
            idx = FULL.find(m, idx + 1)
    for lo, hi in spans:
        for a in range(lo, hi + 1):
            for b in range(a, hi + 1):
                _assert_full_result(*_run([FULL[:a], FULL[a:b], FULL[b:]]))


def test_marker_is_not_released_early_and_no_extra_latency():
    sp = ThinkingSplitter()
    assert sp.feed("Hello ◁thi") == Split("", "Hello ")
    assert sp.held_text == "◁thi"
    assert sp.feed("nk") == Split()
    assert sp.feed("▷rea") == Split("rea", "")
    assert sp.in_thinking and sp.thinking_segments == 1
    assert sp.feed("son◁/") == Split("son", "")
    assert sp.feed("think▷\n\nAns") == Split("", "\n\nAns")
    assert not sp.in_thinking
    assert sp.finish() == Split()


def test_lookalike_prefix_is_released_as_text():
    sp = ThinkingSplitter()
    assert sp.feed("◁thin") == Split()
    assert sp.feed("x") == Split("", "◁thinx")
    # A prefix that restarts: "◁◁think▷" -> first "◁" is text, then a real marker.
    assert sp.feed("◁") == Split()
    assert sp.feed("◁") == Split("", "◁")
    assert sp.feed("think▷t") == Split("t", "")
    assert sp.in_thinking
    # Inside thinking a start-marker prefix is not held; an end-marker prefix is.
    assert sp.feed("◁t") == Split("◁t", "")
    assert sp.feed("◁/thin") == Split()
    assert sp.feed("g") == Split("◁/thing", "")
    assert sp.finish() == Split()
    assert sp.ended_in_thinking


def test_unclosed_thinking():
    thinking, answer, sp = _run(list("pre ◁think▷ still thinking ◁/thi"))
    assert thinking == " still thinking ◁/thi"  # the partial end marker is text at finish
    assert answer == "pre "
    assert sp.ended_in_thinking
    assert sp.thinking_segments == 1


def test_partial_start_marker_at_end_is_answer_text():
    thinking, answer, sp = _run(["answer ◁thi", "nk"])
    assert (thinking, answer) == ("", "answer ◁think")
    assert not sp.ended_in_thinking and sp.thinking_segments == 0


def test_stray_markers_are_kept_as_text():
    # End marker while in answer: answer text. Start marker while thinking: thinking text.
    text = f"a{E}b{S}c{S}d{E}e"
    for chunks in ([text], list(text)):
        thinking, answer, sp = _run(chunks)
        assert answer == f"a{E}be"
        assert thinking == f"c{S}d"
        assert sp.thinking_segments == 1


def test_whitespace_is_not_stripped():
    text = f"\n {S}\n\n think \n{E}\n\nanswer\n "
    thinking, answer, _ = _run(list(text))
    assert thinking == "\n\n think \n"
    assert answer == "\n \n\nanswer\n "


def test_empty_deltas_and_empty_thinking():
    thinking, answer, sp = _run(["", S, "", E, "", "x", ""])
    assert (thinking, answer) == ("", "x")
    assert sp.thinking_segments == 1


def test_custom_markers():
    sp = ThinkingSplitter("<think>", "</think>")
    out = [sp.feed(c) for c in "a<think>b<</think>c"] + [sp.finish()]
    assert "".join(o.thinking for o in out) == "b<"
    assert "".join(o.answer for o in out) == "ac"
    with pytest.raises(ValueError):
        ThinkingSplitter("", "x")
    with pytest.raises(ValueError):
        ThinkingSplitter("x", "x")


def test_feed_after_finish_raises():
    sp = ThinkingSplitter()
    sp.feed("x")
    sp.finish()
    assert sp.finish() == Split()
    with pytest.raises(RuntimeError):
        sp.feed("y")


# -- token attribution ---------------------------------------------------------------------------


def test_token_attribution_marker_tokens_count_as_thinking():
    sp = ThinkingSplitter()
    deltas = ["Hi ", "◁", "think", "▷", "reason", "ing", "◁/", "think", "▷", "\n\nAns", "wer"]
    for n, d in enumerate(deltas, 1):
        sp.feed(d, 1)
        assert sp.thinking_tokens + sp.answer_tokens + sp.held_tokens == n
    sp.finish()
    # "◁", "think" are carried until "▷" completes the start marker: all three are thinking.
    assert sp.thinking_tokens == 8
    assert sp.answer_tokens == 3
    assert sp.held_tokens == 0


def test_token_attribution_carried_tokens():
    sp = ThinkingSplitter()
    sp.feed("◁", 1)
    assert (sp.thinking_tokens, sp.answer_tokens, sp.held_tokens) == (0, 0, 1)
    sp.feed("thin", 2)
    assert (sp.thinking_tokens, sp.answer_tokens, sp.held_tokens) == (0, 0, 3)
    sp.feed("x", 1)  # false alarm: the held text is answer, so are its tokens
    assert (sp.thinking_tokens, sp.answer_tokens, sp.held_tokens) == (0, 4, 0)
    sp.feed("◁thi", 1)
    sp.finish()  # never completed: answer text, answer tokens
    assert (sp.thinking_tokens, sp.answer_tokens, sp.held_tokens) == (0, 5, 0)


def test_token_attribution_rules():
    sp = ThinkingSplitter()
    sp.feed("answer ◁", 1)  # released text, in answer at its end -> answer
    assert (sp.thinking_tokens, sp.answer_tokens) == (0, 1)
    sp.feed("think▷ x", 2)  # completed a transition into thinking -> thinking
    assert (sp.thinking_tokens, sp.answer_tokens) == (2, 1)
    sp.feed("y◁/think▷ answer", 3)  # transition out of thinking -> thinking
    assert (sp.thinking_tokens, sp.answer_tokens) == (5, 1)
    sp.feed("", 1)  # empty delta (held-back multi-byte char), in answer -> answer
    assert (sp.thinking_tokens, sp.answer_tokens) == (5, 2)
    sp.feed(f"more{S}t{E}", 4)  # into and out of thinking in one delta -> thinking
    assert (sp.thinking_tokens, sp.answer_tokens) == (9, 2)
    sp.finish()


def test_token_attribution_sums_random():
    rng = random.Random(7)
    for _ in range(200):
        sp = ThinkingSplitter()
        total, i = 0, 0
        while i < len(FULL):
            n = rng.randint(0, 6)
            k = rng.randint(0, 3)
            sp.feed(FULL[i : i + n], k)
            total += k
            i += n
            assert sp.thinking_tokens + sp.answer_tokens + sp.held_tokens == total
        sp.finish()
        assert sp.thinking_tokens + sp.answer_tokens == total
        assert sp.held_tokens == 0


def test_token_attribution_one_token_per_char():
    sp = ThinkingSplitter()
    for c in FULL:
        sp.feed(c, 1)
    sp.finish()
    marker_chars = 2 * (len(S) + len(E))
    assert sp.thinking_tokens == len(EXPECTED_THINKING) + marker_chars
    assert sp.answer_tokens == len(EXPECTED_ANSWER)


def test_negative_tokens_rejected():
    with pytest.raises(ValueError):
        ThinkingSplitter().feed("x", -1)


# -- thinking budget -----------------------------------------------------------------------------


def test_force_close_flushes_held_thinking_and_switches_to_answer():
    sp = ThinkingSplitter()
    assert sp.feed(f"{S}abc◁/thi", 3) == Split("abc", "")
    assert sp.held_text == "◁/thi"
    out = sp.force_close()
    assert out == Split("◁/thi", "")
    assert not sp.in_thinking and sp.budget_closed
    assert sp.held_text == ""
    assert sp.feed("The answer", 1) == Split("", "The answer")
    # A later end marker written by the model is stray: answer text.
    assert sp.feed(f" {E}!", 1) == Split("", f" {E}!")
    assert sp.finish() == Split()
    assert not sp.ended_in_thinking
    assert (sp.thinking_tokens, sp.answer_tokens) == (3, 2)


def test_force_close_attributes_carried_tokens_to_thinking():
    sp = ThinkingSplitter()
    sp.feed(S, 1)
    sp.feed("x", 1)
    sp.feed("◁", 1)
    sp.feed("/", 1)
    assert sp.held_tokens == 2
    assert sp.force_close() == Split("◁/", "")
    assert (sp.thinking_tokens, sp.answer_tokens, sp.held_tokens) == (4, 0, 0)


def test_force_close_then_new_thinking_segment():
    sp = ThinkingSplitter()
    sp.feed(f"{S}a")
    sp.force_close()
    assert sp.feed(f"b{S}c{E}d") == Split("c", "bd")
    assert sp.thinking_segments == 2 and sp.budget_closed


def test_force_close_in_answer_is_noop():
    sp = ThinkingSplitter()
    assert sp.feed("answer ◁th") == Split("", "answer ")
    assert sp.force_close() == Split()
    assert not sp.budget_closed
    assert sp.held_text == "◁th"
    sp.finish()
    with pytest.raises(RuntimeError):
        sp.force_close()


# -- client helper -------------------------------------------------------------------------------


def seed_extract_thinking_and_summary(text, bot="◁think▷", eot="◁/think▷"):
    """The seed's helper, verbatim: the compatibility reference."""
    if bot in text and eot not in text:
        return "", text
    if eot in text:
        thinking = text[text.index(bot) + len(bot) : text.index(eot)].strip()
        summary = text[text.index(eot) + len(eot) :].strip()
        return thinking, summary
    return "", text


COMPATIBLE = [
    "",
    "plain answer",
    "  plain answer with spaces \n",
    "answer with ◁ and ▷ and ◁thin and /think▷",
    f"{S}thinking{E}answer",
    f"{S}\nthinking\n{E}\n\nanswer\n",
    f"\n  {S} t {E} a ",
    f"{S}{E}",
    f"{S}{E}answer",
    f"{S}thinking{E}",
    f"{S}  \n {E}  \n",
    f"{S}multi\nline\n\nthinking{E}\n\nmulti\n\nline answer",
    f"{S}thinking with ◁ and ◁/thin{E}answer with ◁th",
    f"{S}a{S}b{E}c",  # a start marker inside thinking is thinking text for both
]


@pytest.mark.parametrize("text", COMPATIBLE)
def test_client_matches_seed_on_compatible_inputs(text):
    assert extract_thinking_and_summary(text) == seed_extract_thinking_and_summary(text)
    r = split_thinking(text)
    assert (r.thinking, r.answer) == seed_extract_thinking_and_summary(text)
    assert not r.unclosed


def test_client_matches_seed_on_compatible_inputs_custom_markers():
    for text in ["<think>t</think>a", "no markers", "<think> t </think>\n a \n"]:
        ours = extract_thinking_and_summary(text, "<think>", "</think>")
        assert ours == seed_extract_thinking_and_summary(text, "<think>", "</think>")


def test_client_multiple_segments():
    text = f"{S} one {E}\n\nfirst answer\n{S}\ntwo\n{E}\n\nfinal answer\n"
    r = split_thinking(text)
    assert r == ThinkingResult("one\n\ntwo", "first answer\n\nfinal answer", ["one", "two"], False)
    assert extract_thinking_and_summary(text) == ("one\n\ntwo", "first answer\n\nfinal answer")
    # The seed keeps only the first segment and leaves markers in the summary.
    seed = seed_extract_thinking_and_summary(text)
    assert seed[0] == "one" and S in seed[1]


def test_client_matches_streaming_splitter_on_full_text():
    r = split_thinking(FULL)
    assert r.segments == [p.strip() for p in THINKING_PIECES]
    assert r.answer == "\n\n".join(p.strip() for p in ANSWER_PIECES)
    assert not r.unclosed


def test_client_unclosed_thinking():
    text = f"{S}\n still thinking ◁/thi"
    assert seed_extract_thinking_and_summary(text) == ("", text)
    assert extract_thinking_and_summary(text) == ("still thinking ◁/thi", "")
    r = split_thinking(text)
    assert r.unclosed and r.segments == ["still thinking ◁/thi"]
    # After a closed segment and some answer.
    r = split_thinking(f"{S}a{E}b{S}c")
    assert r == ThinkingResult("a\n\nc", "b", ["a", "c"], True)


def test_client_eot_without_bot():
    text = "implicit thinking\n◁/think▷\n\nthe answer"
    with pytest.raises(ValueError):
        seed_extract_thinking_and_summary(text)
    assert extract_thinking_and_summary(text) == ("implicit thinking", "the answer")
    # Only the first marker may be an implicit close; later stray eot in answer is answer text.
    r = split_thinking(f"t{E}a{E}b")
    assert (r.thinking, r.answer, r.segments) == ("t", f"a{E}b", ["t"])


def test_client_eot_before_bot():
    text = f"a{E}b{S}c{E}d"
    assert seed_extract_thinking_and_summary(text) == ("", f"b{S}c{E}d")
    assert split_thinking(text) == ThinkingResult("a\n\nc", "b\n\nd", ["a", "c"], False)


def test_client_answer_before_bot():
    text = f"preface {S}t{E} answer"
    assert seed_extract_thinking_and_summary(text) == ("t", "answer")  # seed drops "preface"
    assert extract_thinking_and_summary(text) == ("t", "preface\n\nanswer")


def test_client_empty_segments_kept_in_segments_only():
    r = split_thinking(f"{S} {E}x{S}y{E}")
    assert r.segments == ["", "y"] and r.thinking == "y" and r.answer == "x"


def test_client_no_markers_unchanged():
    r = split_thinking("  text  ")
    assert r == ThinkingResult("", "  text  ", [], False)


def test_client_rejects_bad_markers():
    with pytest.raises(ValueError):
        split_thinking("x", "", "y")
    with pytest.raises(ValueError):
        split_thinking("x", "a", "a")
