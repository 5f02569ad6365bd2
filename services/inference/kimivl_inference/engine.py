"""Engine glue: start vLLM's AsyncLLM and hand it prepared prompts directly.

Prepared prompts skip vLLM's tokenizer and HF processor: token ids and patch tensors
become its multimodal engine input with the same field layout as vLLM's own Kimi-VL
processor (pixel_values flat by image, image_grid_hws batched), and each image's content
hash is its mm hash (the identity used by the encoder, prefix and multimodal caches).
"""
from __future__ import annotations

import dataclasses
import logging
import os

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
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with our function
    gpu_gb = _gpu_memory_gb()
    if args.preset == "none" or (args.preset == "auto" and gpu_gb is None):
        preset = None
    elif args.preset == "auto":
        preset = pick_preset(gpu_gb)
    else:
        preset = PRESETS_BY_NAME[args.preset]
    while True:
        if preset:
            log.info("engine preset %s (GPU %.0f GiB)", preset.name, gpu_gb or 0)
        try:
            return AsyncLLM.from_engine_args(engine_args(args, preset)), preset
        except Exception as e:  # vLLM raises several types for lack of memory
            text = str(e).lower()
            nxt = lower_preset(preset) if preset and args.preset == "auto" else None
            if nxt is None or not any(h in text for h in _OOM_HINTS):
                raise
            log.warning("engine failed to start with preset %s for lack of memory (%s); falling back to %s",
                        preset.name, str(e).splitlines()[0][:200], nxt.name)
            preset = nxt


def reinit_dummy_weights(worker, seed: int = 0) -> dict:
    """Runs in each vLLM worker (collective_rpc). vLLM's dummy weights are uniform ±1e-3 and
    identical across same-shaped tensors: the output ignores the image and MoE routing is
    degenerate. Replace them in place (CUDA graphs stay valid) with N(0, 1/fan_in), norms 1,
    biases 0, and re-derive MLA's absorbed matrices from kv_b_proj."""
    import math

    import torch

    model = worker.model_runner.model
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    n = mla = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            if p.dim() == 1:
                p.fill_(1.0) if "norm" in name else p.zero_()
            else:
                fan_in = p[0].numel() if p.dim() == 4 else p.shape[-1]
                p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)
            n += 1
        for m in model.modules():
            if hasattr(m, "W_UV") and hasattr(m, "W_UK_T") and hasattr(m, "kv_b_proj"):
                w = m.kv_b_proj.weight.T.reshape(m.kv_lora_rank, m.num_heads, m.qk_nope_head_dim + m.v_head_dim)
                w_uk, w_uv = w.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
                m.W_UV.copy_(w_uv.transpose(0, 1))
                m.W_UK_T.copy_(w_uk.permute(1, 2, 0))
                mla += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"params": n, "mla_layers_rederived": mla}


def build_engine_input(prompt, model_dtype, normalizer=None, tensor_data: list | None = None):
    """A validated PreparedPrompt as vLLM's multimodal engine input. Floating tensors are views
    of the message bytes (``tensor_data``: each image's ``pixel_values.data``, already read by
    the validation; read here if None) unless a dtype cast is needed; uint8 (raw pixel) tensors
    are normalized by ``normalizer`` (a :class:`~kimivl_inference.pixels.PixelNormalizer`)."""
    from transformers import BatchFeature
    from vllm.inputs.engine import mm_input
    from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems, PlaceholderRange

    from .pixels import prompt_patches

    token_ids = list(prompt.token_ids)
    if not prompt.images:
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=token_ids)
    pixel_values, grid = prompt_patches(prompt, model_dtype, normalizer, tensor_data)
    hf = BatchFeature({"pixel_values": pixel_values, "image_grid_hws": grid})
    fields = {  # = vLLM's KimiVLMultiModalProcessor._get_mm_fields_config
        "pixel_values": MultiModalFieldConfig.flat_from_sizes("image", grid.prod(-1)),
        "image_grid_hws": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
    }
    return mm_input(
        prompt_token_ids=token_ids,
        mm_kwargs=MultiModalKwargsItems.from_hf_inputs(hf, fields),
        mm_hashes={"image": [img.content_hash for img in prompt.images]},
        mm_placeholders={"image": [PlaceholderRange(offset=img.placeholder_offset, length=img.placeholder_length)
                                   for img in prompt.images]},
    )
