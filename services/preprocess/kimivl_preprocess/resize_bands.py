"""Pillow's BICUBIC resize in bands that can be abandoned, byte for byte the same as one call.

Resizing a 13000x13000 image is one C call of several seconds, which a cancelled request could
not stop. Pillow's resize is separable: one pass along each axis, each rounded to 8 bits, and
every output pixel of a pass depends only on its own row (horizontal pass) or column (vertical
pass). So the first pass can run on bands of rows (or columns) with a cancellation check
between them, pasted together, and the second pass runs once on the image already narrowed
along the first axis: the bytes are those of ``image.resize(size, BICUBIC)``.

Which pass comes first depends on the Pillow version (13.0: vertical first when the height
shrinks by more than twice what the width does; before: always horizontal), so the order is
found once, at import, by resizing small images of shapes that tell the known rules apart. If
no known rule fits this Pillow, resizes run as one call (exact, not abandonable) and
:data:`ORDER_RULE` says so. tests/test_image_bands.py checks the equality.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from .cancel import CancelToken

BICUBIC = Image.Resampling.BICUBIC
BAND_PIXELS = 2 << 20  # source pixels per band (~20-60 ms of work)


def _pillow_13(w: int, h: int, tw: int, th: int) -> bool:
    """Vertical pass first? Pillow 13's ImagingResampleInner."""
    return h - th > 0 and h - th > (w - tw) * 2


def _pillow_12_2(w: int, h: int, tw: int, th: int) -> bool:
    """Pillow 12.2's Image.resize: very tall images vertically first."""
    return h > w * 100 and th < h


def _horizontal_first(w: int, h: int, tw: int, th: int) -> bool:
    return False


_RULES: dict[str, Callable[[int, int, int, int], bool]] = {
    "pillow-13": _pillow_13, "pillow-12.2": _pillow_12_2, "horizontal-first": _horizontal_first}
# Shapes on which the rules disagree: (w, h, tw, th).
_PROBES = ((60, 80, 50, 40), (20, 2100, 16, 2000), (80, 60, 40, 50), (30, 40, 29, 20))


def _find_rule() -> str | None:
    rng = np.random.default_rng(0)
    observed = []
    for w, h, tw, th in _PROBES:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        whole = im.resize((tw, th), BICUBIC).tobytes()
        v_first = im.resize((w, th), BICUBIC).resize((tw, th), BICUBIC).tobytes() == whole
        h_first = im.resize((tw, h), BICUBIC).resize((tw, th), BICUBIC).tobytes() == whole
        if v_first == h_first:
            return None
        observed.append(v_first)
    for name, rule in _RULES.items():
        if [rule(*p) for p in _PROBES] == observed:
            return name
    return None


ORDER_RULE: str | None = _find_rule()


def resize(image: Image.Image, size: tuple[int, int], convert: Callable[[Image.Image], Image.Image],
           cancel: CancelToken | None = None) -> Image.Image:
    """``convert(image).resize(size, BICUBIC)``, where ``convert`` is per pixel (e.g. to RGB), in
    bands with ``cancel`` checked between them."""
    w, h = image.size
    tw, th = size
    if (tw, th) == (w, h):
        return convert(image)
    if ORDER_RULE is None:
        if cancel is not None:
            cancel.check()
        return convert(image).resize(size, BICUBIC)
    vertical_first = _RULES[ORDER_RULE](w, h, tw, th)
    if vertical_first or tw == w:  # columns: the vertical pass first (or alone)
        strip = max(1, BAND_PIXELS // h)
        narrowed = None
        for left in range(0, w, strip):
            if cancel is not None:
                cancel.check()
            part = convert(image.crop((left, 0, min(w, left + strip), h)))
            if th != h:
                part = part.resize((part.width, th), BICUBIC)
            if narrowed is None:
                narrowed = Image.new(part.mode, (w, th))
            narrowed.paste(part, (left, 0))
        second = (tw, th)
    else:  # rows: the horizontal pass first
        band = max(1, BAND_PIXELS // w)
        narrowed = None
        for top in range(0, h, band):
            if cancel is not None:
                cancel.check()
            part = convert(image.crop((0, top, w, min(h, top + band)))).resize((tw, min(h, top + band) - top),
                                                                                BICUBIC)
            if narrowed is None:
                narrowed = Image.new(part.mode, (tw, h))
            narrowed.paste(part, (0, top))
        second = (tw, th)
    if cancel is not None:
        cancel.check()
    return narrowed if narrowed.size == second else narrowed.resize(second, BICUBIC)
