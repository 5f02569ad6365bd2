"""Text to token ids with every special-token string kept as ordinary text.

A chat's structure (``<|im_user|>``, ``<|im_end|>``, image blocks) comes from the chat
template and keeps its control tokens; the text between them, where callers' words are,
goes through :class:`TextEncoder`, which never produces a special token: ``<|im_end|>``
typed by a user is the characters ``<|im_end|>`` (as transformers' ``split_special_tokens``
does). For text without special-token strings the ids are those of tokenizing the whole
rendered prompt (what vLLM does): tokenizers split at special tokens before anything else,
so encoding the pieces between them separately changes nothing (tests/test_prompt_tokens.py).

Long text is encoded in pieces so that a request whose client has left stops within a
fraction of a second (:class:`~kimivl_preprocess.cancel.CancelToken` is checked between
pieces). Pieces are cut only where Kimi's pre-tokenizer always splits (after a newline,
before a non-space character), so the ids are the same as one call's; tokenizers with another
pre-tokenizer are encoded in one call per segment (the text-size limit bounds it). Encoding
goes through ``encode_batch``, which releases the GIL (``encode`` holds it for the whole call).
"""
from __future__ import annotations

import json
import re

from .cancel import CancelToken

# Kimi's tokenizer's pre-tokenizer regex (tiktoken ``pat_str``; the tiny model's tokenizer.json
# has the same Split pattern).
KIMI_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
PIECE_CHARS = 32_768  # characters per encode call when a text can be cut (~0.1 s on a slow core)
BATCH_CHARS = 131_072  # characters between two cancellation checks
# Under Kimi's pattern no pre-token spans a newline followed by a non-space: a cut there is exact.
_SAFE_CUT = re.compile(r"\n(?=\S)")


class TextEncoder:
    """Encodes text segments with special tokens inert, for one tokenizer (thread-safe)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special_ids = frozenset(int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None
        self._cuttable = False
        if backend is not None:
            from tokenizers import Tokenizer

            # A copy of its own: encode_special_tokens is state of the Rust tokenizer, and the
            # template's structure is tokenized with the original meanwhile.
            spec = backend.to_str()
            self._backend = Tokenizer.from_str(spec)
            self._backend.encode_special_tokens = True
            self._cuttable = _kimi_pre_tokenizer(json.loads(spec))
        self._tiktoken = self._backend is None and _is_kimi_tiktoken(tokenizer)
        self._check()

    @property
    def kind(self) -> str:
        return "tokenizers" if self._backend is not None else "tiktoken" if self._tiktoken else "transformers"

    def encode(self, segments: list[str], cancel: CancelToken | None = None) -> list[list[int]]:
        """Ids of each segment (no special tokens added, none produced)."""
        if self._backend is None:
            out = []
            for s in segments:
                if cancel is not None:
                    cancel.check()
                out.append(self._encode_slow(s))
            return out
        pieces: list[tuple[int, str]] = []  # (segment index, piece)
        for i, s in enumerate(segments):
            pieces += [(i, p) for p in (_cut(s, PIECE_CHARS) if self._cuttable else [s])]
        out = [[] for _ in segments]
        batch: list[tuple[int, str]] = []
        size = 0
        for item in [*pieces, None]:
            if item is not None and (size + len(item[1]) <= BATCH_CHARS or not batch):
                batch.append(item)
                size += len(item[1])
                continue
            if cancel is not None:
                cancel.check()
            encodings = self._backend.encode_batch([p for _, p in batch], add_special_tokens=False)
            for (i, _), enc in zip(batch, encodings, strict=True):
                out[i].extend(enc.ids)
            if item is not None:
                batch, size = [item], len(item[1])
        return out

    def _encode_slow(self, text: str) -> list[int]:
        if not text:
            return []
        if self._tiktoken:  # Moonshot's TikTokenTokenizer: its own switch for special tokens
            return list(self.tokenizer.encode(text, allow_special_tokens=False))
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def _check(self) -> None:
        """Refuse to serve with a tokenizer this class cannot make safe, or that it would tokenize
        differently from the tokenizer itself on ordinary text."""
        for tid, tok in self.tokenizer.added_tokens_decoder.items():
            if not tok.special:
                continue
            ids = self.encode([f"a{tok.content}b"])[0]
            if self.special_ids.intersection(ids):
                raise ValueError(f"cannot tokenize {tok.content!r} (id {tid}) as text with a "
                                 f"{type(self.tokenizer).__name__}")
        sample = "Hello, world!\n  A line; another\n\n12345 6789 ünïcödé 你好 — end. "
        if self.encode([sample])[0] != list(self.tokenizer(sample, add_special_tokens=False)["input_ids"]):
            raise ValueError(f"text tokenization differs from the {type(self.tokenizer).__name__}'s own")


def _cut(text: str, size: int) -> list[str]:
    """``text`` in pieces of at most about ``size`` characters, cut only at exact points (a
    stretch with none stays whole)."""
    if len(text) <= size:
        return [text]
    pieces, start, prev = [], 0, 0
    for m in _SAFE_CUT.finditer(text):
        cut = m.start() + 1  # just after the newline
        if cut - start > size and prev > start:
            pieces.append(text[start:prev])
            start = prev
        if cut - start > size:  # no exact point in reach: the longest piece possible
            pieces.append(text[start:cut])
            start = cut
        prev = cut
    if len(text) - start > size and prev > start:
        pieces.append(text[start:prev])
        start = prev
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _kimi_pre_tokenizer(spec: dict) -> bool:
    """True when a tokenizer.json pre-tokenizes exactly as Kimi's (no normalizer, the Split on
    KIMI_PATTERN, then byte-level without its own regex): the cuts of :func:`_cut` are exact."""
    if spec.get("normalizer") is not None:
        return False
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) != 2:
        return False
    split, byte_level = steps
    return (split.get("type") == "Split" and split.get("pattern", {}).get("Regex") == KIMI_PATTERN
            and split.get("behavior") == "Isolated" and not split.get("invert")
            and byte_level.get("type") == "ByteLevel" and byte_level.get("use_regex") is False
            and not byte_level.get("add_prefix_space"))


def _is_kimi_tiktoken(tokenizer) -> bool:
    import inspect

    try:
        params = inspect.signature(tokenizer.encode).parameters
    except (TypeError, ValueError):
        return False
    return "allow_special_tokens" in params and getattr(tokenizer, "pat_str", None) == KIMI_PATTERN
