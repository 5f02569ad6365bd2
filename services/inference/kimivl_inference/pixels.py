"""Raw pixel patches (TENSOR_DTYPE_UINT8) to the vision tower's input, exactly as the processor.

The front door sends patches as the image's bytes (half the size of bfloat16); the Kimi-VL
processor's normalization is then done here: float32 ``x / 255``, minus float32 mean, divided
by float32 std, one cast to the model dtype (what vLLM does to the processor's float32 output),
the values of :func:`kimivl_contract.processor.normalized_values`.
Every output value depends on one input byte and its channel, so :class:`PixelNormalizer`
proves its vectorized torch arithmetic on all 256 values of every channel against that
reference, computed in numpy, when it is made; should a torch build ever round differently,
it uses the reference's table instead.
"""
from __future__ import annotations

import logging

from kimivl_contract.processor import normalized_values

log = logging.getLogger("kimivl.pixels")


class PixelNormalizer:
    """uint8 patches (N, 3, p, p) -> normalized patches in the model dtype."""

    def __init__(self, mean, std, dtype):
        import torch

        self.dtype = dtype
        # What makes the same bytes different model input: part of a uint8 tensor's identity.
        self.fingerprint = f"normalize:{tuple(mean)}/{tuple(std)}->{dtype}:".encode()
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        expected = torch.from_numpy(normalized_values(mean, std)).to(dtype)  # (3, 256)
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


def prompt_patches(prompt, model_dtype, normalizer: PixelNormalizer | None = None, tensor_data: list | None = None,
                   raw: bool = False):
    """A validated PreparedPrompt's images as the processor's outputs: ``pixel_values``
    (sum h*w, 3, 14, 14) in the model dtype and ``image_grid_hws`` (n, 2) int64, or (None, None)
    without images. Floating tensors are views of the message bytes (``tensor_data``: each
    image's ``pixel_values.data``, already read by the validation; read here if None) unless a
    cast is needed; uint8 (raw pixel) tensors are normalized by ``normalizer``, or, with ``raw``
    (every image uint8; the engine normalizes on its device), left as they are."""
    import warnings

    import torch

    from kimivl_contract import dtypes

    if not prompt.images:
        return None, None
    tensors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we never write to it
        for i, img in enumerate(prompt.images):
            t = img.pixel_values
            data = tensor_data[i] if tensor_data is not None else t.data
            x = torch.frombuffer(data, dtype=getattr(torch, dtypes.BY_PROTO[t.dtype].name)).view(*t.shape)
            if raw:
                tensors.append(x)
            elif x.dtype == torch.uint8:
                if normalizer is None:
                    raise ValueError("uint8 pixel values need a PixelNormalizer")
                tensors.append(normalizer(x))
            else:
                tensors.append(x.to(model_dtype))  # vLLM casts processor outputs to the model dtype too
    pixel_values = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
    grid = torch.tensor([[img.grid_height, img.grid_width] for img in prompt.images], dtype=torch.int64)
    return pixel_values, grid
