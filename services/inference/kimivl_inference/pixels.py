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
