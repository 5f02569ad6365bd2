"""vLLM worker extension: re-initialise dummy weights in place, by method name.

vLLM's dummy weights (``--load-format dummy``) are uniform ±1e-3 and the same in every tensor of
a shape, so the output ignores the image and MoE routing is degenerate. Our inference tier fixes
that with ``--reinit-dummy-weights``; for ``vllm serve`` and the in-process engine ceiling this
class carries the same function into vLLM's workers, where it can be called by name:

    vllm serve MODEL --load-format dummy --worker-extension-cls reinit_ext.ReinitExtension ...
    # with VLLM_SERVER_DEV_MODE=1 and this folder on PYTHONPATH:
    curl -X POST localhost:8000/collective_rpc -d '{"method": "reinit_dummy_weights", "args": [0]}'

    await async_llm.collective_rpc("reinit_dummy_weights", args=(0,))   # no pickled callables

Same seed, same function as the inference tier: every system serves identical weights.

CPU only: vLLM's CPU backend pre-packs linear weights at load (oneDNN / sgl kernels) and drops
the originals of most of them, so an in-place re-initialisation does not reach those layers and
the output still barely depends on the image. ``repack_cpu=1`` also gives the dropped weights
N(0, 1/fan_in) values (from seed + 1) and re-packs every packed layer. The inference tier's
``--reinit-dummy-weights`` does not do this, so use it only to show that re-initialisation
makes the output depend on the image, not when comparing systems on a CPU.
"""
from __future__ import annotations


class ReinitExtension:
    """Mixed into vLLM's worker class (``--worker-extension-cls``); ``self`` is the worker."""

    def reinit_dummy_weights(self, seed=0, repack_cpu=0) -> dict:
        from kimivl_devtools.reinit import reinit_dummy_weights

        out = reinit_dummy_weights(self, int(seed))  # /collective_rpc passes JSON args as given
        if int(repack_cpu):
            out["cpu_layers_repacked"] = _repack_cpu(self.model_runner.model, int(seed) + 1)
        return out


def _repack_cpu(model, seed: int) -> int:
    import math

    import torch
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for _, m in model.named_modules():
            w = getattr(m, "weight", None)
            if not hasattr(m, "cpu_linear") or not isinstance(w, torch.Tensor) or m.cpu_linear is torch.nn.functional.linear:
                continue
            if w.numel() == 0:  # packed at load, original dropped: make a new one
                out = getattr(m, "output_size_per_partition", None) or m.output_size
                inp = getattr(m, "input_size_per_partition", None) or m.input_size
                new = torch.empty(out, inp, dtype=w.dtype).normal_(0.0, 1.0 / math.sqrt(inp), generator=g)
                m.weight = torch.nn.Parameter(new, requires_grad=False)
                dispatch_cpu_unquantized_gemm(m, remove_weight=True)
            elif w.dim() == 2:  # packed copy of a weight that was kept (e.g. lm_head): pack again
                dispatch_cpu_unquantized_gemm(m, remove_weight=False)
            else:
                continue
            n += 1
    return n
