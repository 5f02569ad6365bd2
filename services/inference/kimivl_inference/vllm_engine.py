"""Start vLLM's AsyncLLM from the tier's options: engine arguments, presets by GPU memory and
the out-of-memory fallback of ``--preset auto``."""
from __future__ import annotations

import dataclasses
import logging
import os

from .engine_threads import engine_threads
from .options import PRESETS_BY_NAME, Preset, lower_preset, pick_preset

log = logging.getLogger("kimivl.engine")

_OOM_HINTS = ("out of memory", "no available memory", "insufficient memory", "not enough memory",
              "cuda error: out of memory", "kv cache", "cannot allocate")


def _gpu_memory_gb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def engine_args(args, preset: Preset | None):
    """AsyncEngineArgs from the CLI options, the preset filling what was not given."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    kw = dict(
        model=args.model, trust_remote_code=True, dtype=args.dtype, seed=args.seed,
        enforce_eager=args.enforce_eager, load_format=args.load_format,
        limit_mm_per_prompt={"image": args.limit_mm_per_prompt},
        enable_prefix_caching=not args.no_prefix_caching,
        # Requests arrive preprocessed; caching them again in the frontend only costs memory.
        mm_processor_cache_gb=0,
    )
    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    chosen = {
        "max_num_seqs": args.max_num_seqs if args.max_num_seqs is not None else preset and preset.max_num_seqs,
        "max_model_len": args.max_model_len if args.max_model_len is not None else preset and preset.max_model_len,
        "gpu_memory_utilization": args.gpu_memory_utilization if args.gpu_memory_utilization is not None
        else preset and preset.gpu_memory_utilization,
        "swap_space": args.swap_space if args.swap_space is not None else preset and preset.swap_space_gb,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        # vLLM then traces its own request spans, under ours (trace_headers), to the same collector.
        "otlp_traces_endpoint": getattr(args, "otlp_traces_endpoint", None),
    }
    for name, value in chosen.items():
        if value is None:
            continue
        if name not in fields:
            log.info("this vLLM has no %s; ignoring %s=%s", name, name, value)
            continue
        kw[name] = value
    if args.device == "cpu" or (args.device == "auto" and _gpu_memory_gb() is None):
        kw.pop("gpu_memory_utilization", None)
    return AsyncEngineArgs(**kw)


def start_engine(args):
    """Start AsyncLLM; with `--preset auto` on a GPU, fall back one preset on out-of-memory."""
    from vllm.v1.engine.async_llm import AsyncLLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if getattr(args, "reinit_dummy_weights", False):
        if args.load_format != "dummy":
            raise SystemExit("--reinit-dummy-weights needs --load-format dummy")
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function of ours
    gpu_gb = _gpu_memory_gb()
    if args.preset == "none" or (args.preset == "auto" and gpu_gb is None):
        preset = None
    elif args.preset == "auto":
        preset = pick_preset(gpu_gb)
    else:
        preset = PRESETS_BY_NAME[args.preset]
    on_gpu = gpu_gb is not None and args.device != "cpu"
    while True:
        if preset:
            log.info("engine preset %s (GPU %.0f GiB)", preset.name, gpu_gb or 0)
        try:
            with engine_threads(getattr(args, "engine_torch_threads", 1), on_gpu) as threads:
                log.info("engine processes' torch intra-op threads: %s", threads)
                return AsyncLLM.from_engine_args(engine_args(args, preset)), preset
        except Exception as e:  # vLLM raises several types for lack of memory
            text = str(e).lower()
            nxt = lower_preset(preset) if preset and args.preset == "auto" else None
            if nxt is None or not any(h in text for h in _OOM_HINTS):
                raise
            log.warning("engine failed to start with preset %s for lack of memory (%s); falling back to %s",
                        preset.name, str(e).splitlines()[0][:200], nxt.name)
            preset = nxt
