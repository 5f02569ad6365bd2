"""Raw pixel patches (TENSOR_DTYPE_UINT8) to the vision tower's input, exactly as the processor.

The front door sends patches as the image's bytes (half the size of bfloat16); the Kimi-VL
processor's normalization is then done here: float32 ``x / 255``, minus float32 mean, divided
by float32 std, one cast to the model dtype (what vLLM does to the processor's float32 output).
Every output value depends on one input byte and its channel, so :class:`PixelNormalizer`
proves its vectorized torch arithmetic on all 256 values of every channel against that
reference, computed in numpy, when it is made; should a torch build ever round differently,
it uses the reference's table instead.
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

log = logging.getLogger("kimivl.pixels")

DEFAULT_MEAN = (0.5, 0.5, 0.5)  # Kimi-VL-A3B's preprocessor_config.json
DEFAULT_STD = (0.5, 0.5, 0.5)


def read_normalization(model_dir: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean and image_std from ``<model_dir>/preprocessor_config.json`` (defaults if absent)."""
    path = os.path.join(model_dir or "", "preprocessor_config.json")
    raw = {}
    if model_dir and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    mean = tuple(float(v) for v in raw.get("image_mean", DEFAULT_MEAN))
    std = tuple(float(v) for v in raw.get("image_std", DEFAULT_STD))
    if len(mean) != 3 or len(std) != 3 or 0.0 in std:
        raise ValueError(f"{path}: image_mean/image_std must be 3 values, std non-zero")
    return mean, std


def reference_table(mean, std) -> np.ndarray:
    """(3, 256) float32: the processor's value for each byte of each channel."""
    x = np.arange(256, dtype=np.float32) / np.float32(255)
    return np.stack([(x - np.float32(m)) / np.float32(s) for m, s in zip(mean, std, strict=True)])


class PixelNormalizer:
    """uint8 patches (N, 3, p, p) -> normalized patches in the model dtype."""

    def __init__(self, mean, std, dtype):
        import torch

        self.dtype = dtype
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        expected = torch.from_numpy(reference_table(mean, std)).to(dtype)  # (3, 256)
        # Every byte in every channel, in a tensor large enough for the vectorized loops.
        probe = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1).expand(256, 3, 14, 14).contiguous()
        got = self._arithmetic(probe)
        self.exact = bool(torch.equal(got, expected.T.reshape(256, 3, 1, 1).expand_as(got)))
        self._table = expected.reshape(-1)  # channel c, byte b at c * 256 + b
        self._offsets = (torch.arange(3) * 256).view(1, 3, 1, 1)
        if not self.exact:
            log.warning("torch's float32 arithmetic differs from the processor's; normalizing by table lookup")

    def _arithmetic(self, x):
        import torch

        return x.to(torch.float32).div_(255.0).sub_(self._mean).div_(self._std).to(self.dtype)

    def __call__(self, x):
        if self.exact:
            return self._arithmetic(x)
        return self._table[x.long() + self._offsets]


def prompt_patches(prompt, model_dtype, normalizer: PixelNormalizer | None = None, tensor_data: list | None = None):
    """A validated PreparedPrompt's images as the processor's outputs: ``pixel_values``
    (sum h*w, 3, 14, 14) in the model dtype and ``image_grid_hws`` (n, 2) int64, or (None, None)
    without images. Floating tensors are views of the message bytes (``tensor_data``: each
    image's ``pixel_values.data``, already read by the validation; read here if None) unless a
    cast is needed; uint8 (raw pixel) tensors are normalized by ``normalizer``."""
    import warnings

    import torch

    from kimivl.prepared import DTYPES

    if not prompt.images:
        return None, None
    tensors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we never write to it
        for i, img in enumerate(prompt.images):
            t = img.pixel_values
            data = tensor_data[i] if tensor_data is not None else t.data
            x = torch.frombuffer(data, dtype=getattr(torch, DTYPES[t.dtype][0])).view(*t.shape)
            if x.dtype == torch.uint8:
                if normalizer is None:
                    raise ValueError("uint8 pixel values need a PixelNormalizer")
                tensors.append(normalizer(x))
            else:
                tensors.append(x.to(model_dtype))  # vLLM casts processor outputs to the model dtype too
    pixel_values = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
    grid = torch.tensor([[img.grid_height, img.grid_width] for img in prompt.images], dtype=torch.int64)
    return pixel_values, grid
