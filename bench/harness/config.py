"""Engine arguments: one list in vLLM's flag spelling, rendered for each system.

Every system gets the same engine arguments; the only per-system value is its share of GPU
memory when several systems share one GPU (``--gpu-share``).
"""
from __future__ import annotations

import argparse
import json
import shlex

# GPU defaults are the issue's; --cpu switches to the CPU engine's.
ENGINE_GPU = {"max_num_seqs": 256, "max_model_len": 16384, "max_num_batched_tokens": 8192,
              "gpu_memory_utilization": 0.85, "dtype": "bfloat16", "prefix_caching": True,
              "enforce_eager": False, "limit_images": 8, "seed": 0}
ENGINE_CPU = {**ENGINE_GPU, "max_num_seqs": 16, "max_model_len": 8192, "gpu_memory_utilization": None,
              "enforce_eager": True}


def engine_config(text: str, cpu: bool) -> dict:
    """--engine-args, in vLLM's own flag spelling, over the GPU or CPU defaults."""
    p = argparse.ArgumentParser(prog="--engine-args", add_help=False)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--gpu-memory-utilization", type=float)
    p.add_argument("--dtype")
    p.add_argument("--enable-prefix-caching", dest="prefix_caching", action="store_true", default=None)
    p.add_argument("--no-enable-prefix-caching", "--no-prefix-caching", dest="prefix_caching",
                   action="store_false")
    p.add_argument("--enforce-eager", dest="enforce_eager", action="store_true", default=None)
    p.add_argument("--no-enforce-eager", dest="enforce_eager", action="store_false")
    p.add_argument("--limit-mm-per-prompt", dest="limit_images", type=int, help="images per request")
    p.add_argument("--seed", type=int)
    given = vars(p.parse_args(shlex.split(text or "")))
    cfg = dict(ENGINE_CPU if cpu else ENGINE_GPU)
    cfg.update({k: v for k, v in given.items() if v is not None})
    return cfg


def parse_gpu_share(text: str | None) -> tuple[float | None, dict[str, float]]:
    """``--gpu-share``: "0.31" (every system) or "ours:12=0.31,ceiling=0.3" (per system name;
    a bare number among them is the default)."""
    default, per = None, {}
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        name, eq, val = item.rpartition("=")
        v = float(val)
        if not 0 < v < 1:
            raise SystemExit(f"--gpu-share {item!r}: a fraction of GPU memory between 0 and 1")
        if eq:
            per[name] = v
        else:
            default = v
    return default, per


def _memory(e: dict, cpu: bool, share: float | None) -> float | None:
    if cpu:
        return None
    return share if share is not None else e["gpu_memory_utilization"]


def ours_inference_flags(e: dict, cpu: bool, share: float | None = None) -> list[str]:
    f = ["--preset", "none", "--load-format", "dummy", "--reinit-dummy-weights", "--seed", str(e["seed"]),
         "--dtype", e["dtype"], "--max-num-seqs", str(e["max_num_seqs"]), "--max-model-len", str(e["max_model_len"]),
         "--max-num-batched-tokens", str(e["max_num_batched_tokens"]), "--limit-mm-per-prompt", str(e["limit_images"])]
    mem = _memory(e, cpu, share)
    if mem is not None:
        f += ["--gpu-memory-utilization", str(mem)]
    if e["enforce_eager"]:
        f.append("--enforce-eager")
    if not e["prefix_caching"]:
        f.append("--no-prefix-caching")
    if cpu:
        f += ["--device", "cpu"]
    return f


def vllm_serve_flags(e: dict, cpu: bool, share: float | None = None) -> list[str]:
    f = ["--trust-remote-code", "--load-format", "dummy", "--seed", str(e["seed"]), "--dtype", e["dtype"],
         "--max-num-seqs", str(e["max_num_seqs"]), "--max-model-len", str(e["max_model_len"]),
         "--max-num-batched-tokens", str(e["max_num_batched_tokens"]),
         "--limit-mm-per-prompt", json.dumps({"image": e["limit_images"]}),
         "--enable-prefix-caching" if e["prefix_caching"] else "--no-enable-prefix-caching",
         "--worker-extension-cls", "reinit_ext.ReinitExtension"]
    mem = _memory(e, cpu, share)
    if mem is not None:
        f += ["--gpu-memory-utilization", str(mem)]
    if e["enforce_eager"]:
        f.append("--enforce-eager")
    return f


def ceiling_engine_kwargs(model: str, e: dict, cpu: bool, share: float | None = None) -> dict:
    kw = {"model": model, "trust_remote_code": True, "load_format": "dummy", "seed": e["seed"], "dtype": e["dtype"],
          "max_num_seqs": e["max_num_seqs"], "max_model_len": e["max_model_len"],
          "max_num_batched_tokens": e["max_num_batched_tokens"], "limit_mm_per_prompt": {"image": e["limit_images"]},
          "enable_prefix_caching": e["prefix_caching"], "enforce_eager": e["enforce_eager"],
          "mm_processor_cache_gb": 0,  # as the inference tier: requests arrive preprocessed
          "worker_extension_cls": "reinit_ext.ReinitExtension"}
    mem = _memory(e, cpu, share)
    if mem is not None:
        kw["gpu_memory_utilization"] = mem
    return kw
