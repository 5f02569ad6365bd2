"""Kimi-VL's special tokens and thinking markers.

The ids are those of Moonshot's tokenizer (its 256 special ids are 163584..163839); the tiny
model's tokenizer reuses them, so prompts, stop ids and placeholders are the same for both.
"""
from __future__ import annotations

IMAGE_PAD = "<|media_pad|>"
MEDIA_START = "<|media_start|>"
MEDIA_CONTENT = "<|media_content|>"
MEDIA_END = "<|media_end|>"
# One image in a rendered prompt; its single IMAGE_PAD is expanded to the image's token count.
IMAGE_BLOCK = f"{MEDIA_START}image{MEDIA_CONTENT}{IMAGE_PAD}{MEDIA_END}"
# Tokens only the server may place: a client writing them would forge an image slot.
MEDIA_TOKENS = (MEDIA_START, MEDIA_CONTENT, IMAGE_PAD, MEDIA_END)

# Plain text in Kimi's tokenizer (several tokens each), not special tokens.
THINK_START = "◁think▷"
THINK_END = "◁/think▷"

SPECIAL_BASE = 163584
SPECIAL_TOKENS = {
    "[BOS]": 163584,
    "[EOS]": 163585,
    "<|im_end|>": 163586,
    "<|im_user|>": 163587,
    "<|im_assistant|>": 163588,
    "<|im_system|>": 163594,
    "<|im_middle|>": 163601,
    MEDIA_START: 163602,
    MEDIA_CONTENT: 163603,
    MEDIA_END: 163604,
    IMAGE_PAD: 163605,
    "[UNK]": 163838,
    "[PAD]": 163839,
}
