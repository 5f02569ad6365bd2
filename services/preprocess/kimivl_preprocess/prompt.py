"""Prompt building: chat template, tokenization and image placeholder expansion.

The chat template and tokenizer come from the model directory (transformers AutoTokenizer;
the real checkpoint's tiktoken tokenizer is remote code). Each image becomes Kimi-VL's
image block, whose single ``<|media_pad|>`` is then expanded to the image's token count
(grid_h * grid_w / 4) directly in the token ids, as vLLM's Kimi-VL processor does.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from kimivl_contract.errors import RequestError
from kimivl_contract.tokens import IMAGE_BLOCK, IMAGE_PAD
from kimivl_contract.tokens import MEDIA_TOKENS as RESERVED_TOKENS

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
            if kind == "text":
                _check_text(part.text, f"{field}.content[{j}].text")
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


class PromptBuilder:
    """Renders and tokenizes prompts with the model directory's tokenizer."""

    def __init__(self, model_dir: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
        self.pad_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        if self.pad_id is None or self.pad_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer in {model_dir} has no {IMAGE_PAD} token; is this a Kimi-VL model?")
        self.max_model_len = _context_length(model_dir)

    def render_chat(self, messages: list[ChatMessage]) -> str:
        hf = [
            {"role": m.role, "content": [
                {"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"}
                for p in m.parts]}
            for m in messages
        ]
        return self.tokenizer.apply_chat_template(hf, tokenize=False, add_generation_prompt=True)

    @staticmethod
    def render_raw(text: str) -> str:
        return text.replace(RAW_IMAGE_MARKER, IMAGE_BLOCK)

    def tokenize(self, text: str, *, chat: bool) -> list[int]:
        # vLLM's chat path tokenizes the rendered template without adding special tokens
        # (the template has them); its raw-prompt path lets the tokenizer add them.
        return list(self.tokenizer(text, add_special_tokens=not chat)["input_ids"])

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


def _context_length(model_dir: str) -> int | None:
    """The model's context length from config.json (text_config.max_position_embeddings)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        cfg = json.load(f)
    text = cfg.get("text_config", cfg)
    return text.get("max_position_embeddings")
