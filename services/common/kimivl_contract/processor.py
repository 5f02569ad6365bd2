"""The Kimi-VL image processor's settings and arithmetic, shared by every implementation of it.

Three places compute what Moonshot's ``KimiVLImageProcessor`` computes: the front door's fast
pipeline (kimivl_preprocess.image), the inference tier's normalization of raw uint8 patches
(kimivl_inference.pixels) and the HF processor registered for vLLM's own path
(kimivl_inference.hf_processor). They take the settings, the resize rule and the
normalization values from here, so they cannot drift apart.

* :class:`ProcessorConfig` — ``preprocessor_config.json``, read in one place.
* :func:`target_size` — the size an image is resized to: the token limit, then the vision
  tower's 512 patches a side (the one deliberate deviation from the reference: such an image
  is shrunk to fit instead of failing in vLLM).
* :func:`grid_size`, :func:`image_tokens` — the grid and token count of an image of a given size.
* :func:`normalized_values` — the processor's value for each byte of each channel: float32
  ``x / 255``, minus float32 mean, divided by float32 std. Every output value depends on one
  input byte and its channel, so a (3, 256) table is the whole arithmetic.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ProcessorConfig:
    """The Kimi-VL processor's settings (defaults: Kimi-VL-A3B-Thinking-2506)."""

    patch_size: int = 14
    merge_kernel_size: tuple[int, int] = (2, 2)
    in_token_limit: int = 16384
    pad_input: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_grid_side: int = 512

    def __post_init__(self) -> None:
        # Canonical types (JSON gives lists, maybe ints), so equal settings fingerprint alike.
        object.__setattr__(self, "merge_kernel_size", tuple(int(m) for m in self.merge_kernel_size))
        for name in ("image_mean", "image_std"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        mh, mw = self.merge_kernel_size
        if self.patch_size < 1 or mh < 1 or mw < 1 or self.in_token_limit < 1:
            raise ValueError(f"invalid processor config: {self}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0 in self.image_std:
            raise ValueError(f"image_mean/image_std must be 3 values, std non-zero: {self}")
        if not self.pad_input:
            # The reference then center-crops to whole patches, which can leave grids the
            # patch merger cannot take; Kimi-VL models all pad.
            raise ValueError("pad_input=false is not supported")
        if self.max_grid_side < max(mh, mw):
            raise ValueError(f"max_grid_side {self.max_grid_side} is below the merge kernel")

    @classmethod
    def from_model_dir(cls, path: str | None) -> ProcessorConfig:
        """Settings from ``<path>/preprocessor_config.json``; defaults when absent or None."""
        if path is None:
            return cls()
        file = os.path.join(path, "preprocessor_config.json")
        if not os.path.isfile(file):
            return cls()
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
        keys = ("patch_size", "merge_kernel_size", "in_token_limit", "pad_input", "image_mean",
                "image_std")  # fmt: skip
        return cls(**{k: raw[k] for k in keys if k in raw})

    def fingerprint(self) -> bytes:
        """Every setting that changes the output, for the content hash."""
        return repr(tuple(getattr(self, f) for f in self.__dataclass_fields__)).encode()



def target_size(width: int, height: int, config: ProcessorConfig) -> tuple[int, int]:
    """The (width, height) the processor resizes to; the input size when no resize is due."""
    p = config.patch_size
    patches = (width // p) * (height // p)
    w, h = width, height
    if patches > config.in_token_limit:
        s = math.sqrt(config.in_token_limit / patches)
        w, h = max(1, int(w * s)), max(1, int(h * s))
    # Largest side whose padded grid stays within max_grid_side patches.
    mh, mw = config.merge_kernel_size
    max_h = config.max_grid_side // mh * mh * p
    max_w = config.max_grid_side // mw * mw * p
    if w * max_h >= h * max_w and w > max_w:  # width binds: exactly max_w, height scaled alike
        w, h = max_w, max(1, h * max_w // w)
    elif h > max_h:
        w, h = max(1, w * max_h // h), max_h
    return w, h


def normalized_values(mean, std) -> np.ndarray:
    """(3, 256) float32: the processor's normalized value of each byte in each channel."""
    x = np.arange(256, dtype=np.float32) / np.float32(255)
    return np.stack([(x - np.float32(m)) / np.float32(s) for m, s in zip(mean, std, strict=True)])


def grid_size(width: int, height: int, config: ProcessorConfig) -> tuple[int, int]:
    """(patch rows, patch columns) of an image of this size once processed: :func:`target_size`,
    padded up to whole merge kernels. Known from the image's header, before any decoding."""
    w, h = target_size(width, height, config)
    p = config.patch_size
    mh, mw = config.merge_kernel_size
    return -(-h // (mh * p)) * mh, -(-w // (mw * p)) * mw


def image_tokens(width: int, height: int, config: ProcessorConfig) -> int:
    """Placeholder tokens an image of this size takes in the prompt."""
    gh, gw = grid_size(width, height, config)
    mh, mw = config.merge_kernel_size
    return gh * gw // (mh * mw)
