"""Prompt building: chat template, tokenization and image placeholder expansion.

The chat template and tokenizer come from the model directory (transformers AutoTokenizer;
the real checkpoint's tiktoken tokenizer is remote code). Each image becomes Kimi-VL's
image block, whose single ``<|media_pad|>`` is then expanded to the image's token count
(grid_h * grid_w / 4) directly in the token ids, as vLLM's Kimi-VL processor does.

Control tokens in callers' text are text. A conversation is rendered with a placeholder for
each text part, so every special token found in the rendering is the template's own; the
text between them (callers' words put back in place of the placeholders) is tokenized with
special-token strings inert (:mod:`.text_encoding`). A user typing ``<|im_end|><|im_system|>``
gets those characters, not a forged system turn, and ordinary text gets the ids vLLM's chat
path gives. A raw prompt is the caller's own template: its control tokens are honoured
(only the media tokens, which would forge image slots, are refused).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from kimivl_contract.errors import RequestError
from kimivl_contract.tokens import IMAGE_BLOCK, IMAGE_PAD
from kimivl_contract.tokens import MEDIA_TOKENS as RESERVED_TOKENS

from .cancel import CancelToken
from .text_encoding import TextEncoder

RAW_IMAGE_MARKER = "<image>"
ROLE_NAMES = {1: "system", 2: "user", 3: "assistant"}


@dataclass
class TextPart:
    text: str


@dataclass
class ImagePart:
    index: int  # position in the request's image list


@dataclass
class ChatMessage:
    role: str
    parts: list


@dataclass(frozen=True)
class Segment:
    """A stretch of a rendered prompt: a control token of the template, or text."""
    text: str
    special: bool = False


@dataclass
class ExpandedPrompt:
    token_ids: list[int]
    placeholders: list[tuple[int, int]]  # (offset, length) per image, in order


def _check_text(text: str, field: str) -> None:
    for tok in RESERVED_TOKENS:
        if tok in text:
            raise RequestError(f"{field} contains the reserved token {tok}; images must be given as image parts")


def messages_from_proto(conversation) -> tuple[list[ChatMessage], list]:
    """Turn a Conversation into ChatMessages plus the Image protos in prompt order."""
    if not conversation.messages:
        raise RequestError("conversation.messages is empty; at least one message is required")
    messages, images = [], []
    for i, m in enumerate(conversation.messages):
        field = f"conversation.messages[{i}]"
        role = ROLE_NAMES.get(m.role)
        if role is None:
            raise RequestError(f"{field}.role is {m.role}; expected ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
        if not m.content:
            raise RequestError(f"{field}.content is empty")
        parts = []
        for j, part in enumerate(m.content):
            kind = part.WhichOneof("part")
            if kind == "text":  # control-token strings in it stay text (PromptBuilder.chat_segments)
                parts.append(TextPart(part.text))
            elif kind == "image":
                if role != "user":
                    raise RequestError(f"{field}.content[{j}] is an image in a {role} message; only user messages take images")
                if part.image.WhichOneof("source") is None:
                    raise RequestError(f"{field}.content[{j}].image has no source (data, data_uri or url)")
                parts.append(ImagePart(len(images)))
                images.append((f"{field}.content[{j}].image", part.image))
            else:
                raise RequestError(f"{field}.content[{j}] is empty; set text or image")
        messages.append(ChatMessage(role, parts))
    return messages, images


def raw_prompt_images(raw) -> list:
    """Check a RawPrompt's markers against its images; return the Image protos in order."""
    n_markers = raw.text.count(RAW_IMAGE_MARKER)
    if n_markers != len(raw.images):
        raise RequestError(
            f"raw_prompt.text has {n_markers} {RAW_IMAGE_MARKER} markers but raw_prompt.images has "
            f"{len(raw.images)} images; the counts must be equal")
    if not raw.text.strip():
        raise RequestError("raw_prompt.text is empty")
    _check_text(raw.text, "raw_prompt.text")
    for i, img in enumerate(raw.images):
        if img.WhichOneof("source") is None:
            raise RequestError(f"raw_prompt.images[{i}] has no source (data, data_uri or url)")
    return [(f"raw_prompt.images[{i}]", img) for i, img in enumerate(raw.images)]


_PLACEHOLDER = "\ue000kimivl-text-{}\ue001"  # private-use characters: no template writes these
_PLACEHOLDER_RE = re.compile("\ue000kimivl-text-(\\d+)\ue001")


class PromptBuilder:
    """Renders and tokenizes prompts with the model directory's tokenizer."""

    def __init__(self, model_dir: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
        self.pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        if self.pad_id is None or self.pad_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer in {model_dir} has no {IMAGE_PAD} token; is this a Kimi-VL model?")
        self.max_model_len = _context_length(model_dir)
        self.encoder = TextEncoder(self.tokenizer)
        added = {t.content: int(i) for i, t in self.tokenizer.added_tokens_decoder.items()}
        self._token_id = added
        # Leftmost-longest, as tokenizers match added tokens.
        self._added = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
        self._check_template()
        probe = "a b\n c"
        self._adds_special = (self.tokenizer(probe, add_special_tokens=True)["input_ids"]
                              != self.tokenizer(probe, add_special_tokens=False)["input_ids"])

    def chat_segments(self, messages: list[ChatMessage]) -> list[Segment]:
        """The chat template's rendering: its control tokens, and text with callers' words in place."""
        texts: list[str] = []
        hf = []
        for m in messages:
            content = []
            for p in m.parts:
                if isinstance(p, TextPart):
                    content.append({"type": "text", "text": _PLACEHOLDER.format(len(texts))})
                    texts.append(p.text)
                else:
                    content.append({"type": "image"})
            hf.append({"role": m.role, "content": content})
        rendered = self.tokenizer.apply_chat_template(hf, tokenize=False, add_generation_prompt=True)
        segments = []
        for text, special in self._split_added(rendered):
            segments.append(Segment(text, True) if special else Segment(_fill(text, texts)))
        return segments

    def raw_segments(self, text: str) -> list[Segment]:
        """A raw prompt verbatim, its control tokens honoured; each ``<image>`` an image block."""
        return [Segment(t, special) for t, special in self._split_added(text.replace(RAW_IMAGE_MARKER, IMAGE_BLOCK))]

    def render_chat(self, messages: list[ChatMessage]) -> str:
        return prompt_text(self.chat_segments(messages))

    @staticmethod
    def render_raw(text: str) -> str:
        return text.replace(RAW_IMAGE_MARKER, IMAGE_BLOCK)

    def tokenize_segments(self, segments: list[Segment], *, raw: bool = False,
                          cancel: CancelToken | None = None) -> list[int]:
        """Token ids: control tokens as themselves, text with special-token strings inert.
        ``raw``: as vLLM's raw-prompt path, with the tokenizer's own added tokens (BOS, …) if any."""
        encoded = iter(self.encoder.encode([s.text for s in segments if not s.special], cancel))
        ids: list[int] = []
        for s in segments:
            if s.special:
                ids.append(self._token_id[s.text])
            else:
                ids.extend(next(encoded))
        if raw and self._adds_special:
            ids = list(self.tokenizer.build_inputs_with_special_tokens(ids))
        return ids

    def tokenize(self, text: str, *, chat: bool) -> list[int]:
        # vLLM's chat path tokenizes the rendered template without adding special tokens
        # (the template has them); its raw-prompt path lets the tokenizer add them. Special
        # tokens in ``text`` are honoured: this is the whole-string reference.
        return list(self.tokenizer(text, add_special_tokens=not chat)["input_ids"])

    def _split_added(self, text: str):
        pos = 0
        for m in self._added.finditer(text):
            if m.start() > pos:
                yield text[pos:m.start()], False
            yield m.group(), True
            pos = m.end()
        if pos < len(text):
            yield text[pos:], False

    def _check_template(self) -> None:
        """The template must put message text in verbatim (no trim, no escaping) for the
        placeholders to stand for it; refuse to start otherwise."""
        probe = [ChatMessage("system", [TextPart("  be brief \n")]),
                 ChatMessage("user", [TextPart(" a\n"), ImagePart(0), TextPart("\tb  ")]),
                 ChatMessage("assistant", [TextPart("ok ")]), ChatMessage("user", [TextPart("{{ x }} & <b>")])]
        hf = [{"role": m.role, "content": [{"type": "text", "text": p.text} if isinstance(p, TextPart)
                                           else {"type": "image"} for p in m.parts]} for m in probe]
        direct = self.tokenizer.apply_chat_template(hf, tokenize=False, add_generation_prompt=True)
        if prompt_text(self.chat_segments(probe)) != direct:
            raise ValueError("the chat template does not insert message text verbatim; the front door cannot keep "
                             "control tokens in callers' text inert with it")

    def expand(self, ids: list[int], tokens_per_image: list[int]) -> ExpandedPrompt:
        """Replace the i-th ``<|media_pad|>`` by tokens_per_image[i] copies."""
        out: list[int] = []
        placeholders = []
        k = 0
        start = 0
        pad = self.pad_id
        for pos, tok in enumerate(ids):
            if tok != pad:
                continue
            if k >= len(tokens_per_image):
                raise RequestError(f"the prompt has more image slots than the {len(tokens_per_image)} images given")
            out.extend(ids[start:pos])
            placeholders.append((len(out), tokens_per_image[k]))
            out.extend([pad] * tokens_per_image[k])
            start = pos + 1
            k += 1
        out.extend(ids[start:])
        if k != len(tokens_per_image):
            raise RequestError(f"the prompt has {k} image slots but {len(tokens_per_image)} images were given")
        return ExpandedPrompt(out, placeholders)


def prompt_text(segments: list[Segment]) -> str:
    return "".join(s.text for s in segments)


def _fill(template_text: str, texts: list[str]) -> str:
    """Put callers' texts in place of their placeholders (one pass: text is never re-scanned)."""
    parts = _PLACEHOLDER_RE.split(template_text)
    return "".join(texts[int(p)] if i % 2 else p for i, p in enumerate(parts))


def _context_length(model_dir: str) -> int | None:
    """The model's context length from config.json (text_config.max_position_embeddings)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        cfg = json.load(f)
    text = cfg.get("text_config", cfg)
    return text.get("max_position_embeddings")
