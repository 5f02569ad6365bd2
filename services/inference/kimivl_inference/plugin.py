"""The project's ``vllm.general_plugins`` hook, which vLLM runs in every process it starts.

It registers the Kimi-VL HF processor (:mod:`kimivl_inference.hf_processor`) and, only when
``KIMIVL_VISION_FASTPATH=1`` is set (``kimivl serve inference`` sets it unless
``--no-vision-fastpath``), applies the vision fast path (:mod:`kimivl_inference.vision_fastpath`).
Idempotent and never raises: a plugin must not take vLLM down.
"""
from __future__ import annotations


def register() -> None:
    from .hf_processor import register as register_processor
    from .vision_fastpath import apply_from_env

    register_processor()
    apply_from_env()
