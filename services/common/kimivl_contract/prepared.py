"""Validation of PreparedPrompt messages before they reach vLLM.

vLLM trusts multimodal inputs it is handed: a placeholder run longer than the image's
encoder output kills its engine core (every later request fails), a shorter one silently
gives wrong output. Every rule here exists to keep such a prompt out of the engine, and
each failure names the field, the value and the limit.
"""
from __future__ import annotations

from dataclasses import dataclass

from .dtypes import BY_PROTO
from .errors import RequestError

PATCH = 14
CHANNELS = 3
MAX_HASH_LEN = 256


@dataclass(frozen=True)
class PromptLimits:
    pad_id: int
    vocab_size: int
    max_images: int
    max_model_len: int
    merge: tuple[int, int] = (2, 2)
    max_grid_side: int = 512
    # Most tokens one image may have: the engine's encoder cache size, which vLLM sizes
    # as max(max_num_batched_tokens, its own estimate of the largest image).
    max_image_tokens: int | None = None


def check_prepared_prompt(prompt, limits: PromptLimits, field: str = "prompt", tensor_data: list | None = None) -> int:
    """Raise RequestError on the first violation; return the count of image tokens.

    Reading a bytes field copies it (megabytes per image), so a caller that needs the tensors'
    bytes next passes ``tensor_data``: each image's ``pixel_values.data`` is appended to it.
    """
    import numpy as np

    ids = np.asarray(prompt.token_ids, dtype=np.int64)
    n = len(ids)
    if n == 0:
        raise RequestError(f"{field}.token_ids is empty")
    if n > limits.max_model_len:
        raise RequestError(f"{field}.token_ids has {n} tokens; the model's context is {limits.max_model_len}")
    top = int(ids.max())
    if top >= limits.vocab_size:
        at = int(np.argmax(ids >= limits.vocab_size))
        raise RequestError(f"{field}.token_ids[{at}] is {int(ids[at])}; the vocabulary has {limits.vocab_size} ids")
    if len(prompt.images) > limits.max_images:
        raise RequestError(f"{field}.images has {len(prompt.images)} images; the limit is {limits.max_images}",
                           resource_exhausted=True)
    is_pad = ids == limits.pad_id
    mh, mw = limits.merge
    image_tokens = 0
    prev_end = 0
    for i, img in enumerate(prompt.images):
        f = f"{field}.images[{i}]"
        h, w = img.grid_height, img.grid_width
        if h == 0 or w == 0 or h % mh or w % mw:
            raise RequestError(f"{f} grid is {h}x{w}; both sides must be positive multiples of {mh}x{mw}")
        if max(h, w) > limits.max_grid_side:
            raise RequestError(f"{f} grid is {h}x{w}; the vision tower takes at most {limits.max_grid_side} "
                               "patches a side")
        t = img.pixel_values
        if t.dtype not in BY_PROTO:
            raise RequestError(f"{f}.pixel_values.dtype is {t.dtype}; expected a TensorDtype value",
                               field=f"{f}.pixel_values.dtype")
        expect_shape = [h * w, CHANNELS, PATCH, PATCH]
        if list(t.shape) != expect_shape:
            raise RequestError(f"{f}.pixel_values.shape is {list(t.shape)}; expected {expect_shape} "
                               f"for a {h}x{w} grid")
        size = BY_PROTO[t.dtype].itemsize
        expect_bytes = h * w * CHANNELS * PATCH * PATCH * size
        data = t.data
        if len(data) != expect_bytes:
            raise RequestError(f"{f}.pixel_values.data is {len(data)} bytes; shape and dtype need {expect_bytes}")
        if tensor_data is not None:
            tensor_data.append(data)
        tokens = h * w // (mh * mw)
        if limits.max_image_tokens is not None and tokens > limits.max_image_tokens:
            raise RequestError(f"{f} has {tokens} image tokens; the engine's encoder cache holds "
                               f"{limits.max_image_tokens} per image (start the inference tier with a larger "
                               "--max-num-batched-tokens)", resource_exhausted=True)
        off, length = img.placeholder_offset, img.placeholder_length
        if length != tokens:
            raise RequestError(f"{f}.placeholder_length is {length}; a {h}x{w} grid needs {tokens}")
        if off < prev_end:
            raise RequestError(f"{f}.placeholder_offset {off} overlaps or precedes the previous image's tokens "
                               f"(which end at {prev_end}); images must be in prompt order")
        if off + length > n:
            raise RequestError(f"{f} placeholder [{off}, {off + length}) runs past the {n} prompt tokens")
        if not is_pad[off:off + length].all():
            bad = off + int(np.argmin(is_pad[off:off + length]))
            raise RequestError(f"{f}: token_ids[{bad}] is {int(ids[bad])}, not the image pad token "
                               f"{limits.pad_id}, inside the placeholder [{off}, {off + length})")
        if (off > 0 and is_pad[off - 1]) or (off + length < n and is_pad[off + length]):
            raise RequestError(f"{f}: the pad run at {off} is longer than placeholder_length {length}")
        if not img.content_hash or len(img.content_hash) > MAX_HASH_LEN:
            raise RequestError(f"{f}.content_hash must be 1 to {MAX_HASH_LEN} characters")
        image_tokens += tokens
        prev_end = off + length
    total_pad = int(is_pad.sum())
    if total_pad != image_tokens:
        raise RequestError(f"{field}.token_ids has {total_pad} image pad tokens ({limits.pad_id}) but the images "
                           f"account for {image_tokens}; every pad token must belong to an image")
    return image_tokens
