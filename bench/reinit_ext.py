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
"""
from __future__ import annotations


class ReinitExtension:
    """Mixed into vLLM's worker class (``--worker-extension-cls``); ``self`` is the worker."""

    def reinit_dummy_weights(self, seed=0) -> dict:
        from kimivl_inference.engine import reinit_dummy_weights

        return reinit_dummy_weights(self, int(seed))  # /collective_rpc passes JSON args as given
