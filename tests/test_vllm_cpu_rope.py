"""The fix for vLLM's CPU rotary kernel on 3-D (MLA) queries: exact against vLLM's own PyTorch
reference, installed only where the kernel needs it. No engine."""
from __future__ import annotations

import torch

from kimivl_inference import vllm_cpu_rope


class _Rope:
    """The attributes RotaryEmbedding.forward_cpu reads."""

    def __init__(self, cache, head):
        self._cache, self.head_size, self.is_neox_style = cache, head, False

    def _match_cos_sin_cache_dtype(self, query):
        return self._cache


def test_the_fix_is_exact_and_only_installed_when_the_kernel_needs_it():
    kernel_exact = vllm_cpu_rope.kernel_is_exact()
    installed = vllm_cpu_rope.apply()
    assert installed == (not kernel_exact)
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    def patched(positions, q, k, head, cache, neox):
        RotaryEmbedding.forward_cpu(_Rope(cache, head), positions, q, k)

    (q, k), (ref_q, ref_k) = vllm_cpu_rope._probe(patched)
    assert torch.allclose(q, ref_q, atol=1e-6)
    assert torch.allclose(k, ref_k, atol=1e-6)
    assert vllm_cpu_rope.apply() == installed  # idempotent


def test_the_installed_kernel_still_has_the_bug():
    """When vLLM fixes its kernel this fails: then the patch is a no-op and can go."""
    assert not vllm_cpu_rope.kernel_is_exact()


def test_in_place_semantics_for_a_view_of_a_larger_query():
    vllm_cpu_rope.apply()
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    head = 64
    inv = 1.0 / (10000 ** (torch.arange(0, head, 2, dtype=torch.float32) / head))
    ang = torch.arange(32, dtype=torch.float32)[:, None] * inv
    cache = torch.cat([ang.cos(), ang.sin()], dim=-1)
    positions = torch.arange(32)[:5]
    q = torch.randn(5, 4, 96)
    k = torch.randn(5, 576)[:, 512:].unsqueeze(1)  # MLA's k_pe: a strided slice of the latent
    before_nope = q[..., :32].clone()
    ref_q, ref_k = RotaryEmbedding.forward_static(positions, q[..., 32:].contiguous(), k.contiguous(), head, head,
                                                  cache, False)
    RotaryEmbedding.forward_cpu(_Rope(cache, head), positions, q[..., 32:], k)
    assert torch.allclose(q[..., 32:], ref_q, atol=1e-6) and torch.allclose(k, ref_k, atol=1e-6)
    assert torch.equal(q[..., :32], before_nope)  # the rest of the query untouched
