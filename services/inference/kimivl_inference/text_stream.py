"""Token ids to streamed text for the Transformers engine, with vLLM's stop-string rules.

Incremental detokenization over a sliding window (the method vLLM and TGI use): a token's
text is the decode of the window with it minus the decode without it, held back while it
ends in an incomplete character (U+FFFD), so concatenated deltas equal the decode of all
tokens. Works with any transformers tokenizer (Kimi's own is not a fast one). Special tokens
are skipped, as vLLM's ``skip_special_tokens=True``.

Stop strings (vLLM semantics, ``include_stop_str_in_output=False``): the text ends before the
first stop string found; while streaming, the last ``len(longest stop) - 1`` characters are
held back, since they may begin one.
"""
from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # decoded so far (up to a stop string, when one was found)
        self.sent = 0  # characters of text released
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Feed one generated token; the text now safe to release."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            old = len(self.text)
            self.text += after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            for s in self.stop:  # only where a stop string could end in the new text
                i = self.text.find(s, max(0, old - len(s) + 1))
                if i != -1 and (not self.stopped or i < len(self.text)):
                    self.text, self.stopped = self.text[:i], True
        if self.stopped:
            return self.finish()
        return self._release(len(self.text) - self.hold if self.stop else len(self.text))

    def finish(self) -> str:
        """Everything not yet released (at the end of the stream)."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out = self.text[self.sent:upto]
        self.sent = upto
        return out
