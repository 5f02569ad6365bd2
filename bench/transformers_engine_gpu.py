"""Throughput of the Transformers engine (``--engine transformers``) on the full-size architecture.

One process, one engine start: the full-size Kimi-VL-A3B model directory from
``.gpu/build_model_dir.py`` (no weights; the project's modeling code installed as its remote
code), the model built on the GPU with random weights N(0, 1/fan_in) from a seed (norms 1,
biases 0: ``--load-format dummy``), bfloat16, presets as the server picks them. Then for each
concurrency level, that many requests are started at once, each with its own 1024x1024
picture (1369 image tokens: pixel_values as the processor gives them, random pixels) and a
short question, greedy, ``ignore_eos``, 256 output tokens: the workload of the vLLM runs in
/work/shared/gpu/README.md ("Measured"), so the numbers sit beside vLLM's. Reported per level:
wall time, output tokens/s, TTFT and inter-token latency percentiles, the engine's decode
batch; plus start-up time and peak GPU memory. JSON to $OUT (or --out).

GPU (the lead's device call; nothing to stage: torch and transformers are on the image):
    python3 bench/transformers_engine_gpu.py --out $OUT/transformers_engine_h200.json
Rehearsal on CPU with the tiny model:
    .venv/bin/python bench/transformers_engine_gpu.py --tiny --out /tmp/te.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
for sub in ("services/inference", "services/modeling", "services/devtools", "clients/python"):
    sys.path.insert(0, str(ROOT / sub))  # the working tree, not installed on the device
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
T0 = time.perf_counter()
try:
    import prometheus_client  # noqa: F401 - the engine's gauges; not needed to measure
except ImportError:
    import types

    _stub = types.ModuleType("prometheus_client")
    _stub.Gauge = lambda *a, **k: types.SimpleNamespace(set=lambda v: None)
    sys.modules["prometheus_client"] = _stub


def log(*a):
    print(f"[te-bench {time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def model_dir(args) -> str:
    from kimivl_modeling import install_remote_code

    if args.tiny:
        d = ROOT / "models" / "kimi-vl-tiny"
        if not (d / "config.json").exists():
            from kimivl_devtools.tiny_model import make_tiny_model
            make_tiny_model(str(d))
        return str(d)
    out = Path(tempfile.mkdtemp(prefix="kimivl-full-")) / "model"
    builder = Path(args.build_model_dir)
    subprocess.run([sys.executable, str(builder), str(out)], check=True, stdout=subprocess.DEVNULL)
    install_remote_code(out)  # auto_map -> the project's Kimi-VL implementation
    return str(out)


async def run_level(engine, make_input, n: int, out_tokens: int) -> dict:
    from kimivl_inference.transformers_engine import SamplingParams

    p = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, seed=None, repetition_penalty=1.0, stop=None,
                       ignore_eos=True, max_tokens=out_tokens)

    async def one(i):
        t0 = time.perf_counter()
        stamps = []
        async for _ in engine.generate(make_input(i), p, f"lvl{n}-{i}"):
            stamps.append(time.perf_counter())
        return t0, stamps

    t0 = time.perf_counter()
    res = await asyncio.gather(*[one(i) for i in range(n)])
    wall = time.perf_counter() - t0
    ttft = [s[0] - a for a, s in res]
    itl = [b - a for _, s in res for a, b in zip(s, s[1:], strict=False)]
    tokens = sum(len(s) for _, s in res)
    return {"concurrency": n, "requests": n, "output_tokens": tokens, "wall_s": round(wall, 3),
            "output_tok_per_s": round(tokens / wall, 1),
            "ttft_s": {"median": round(statistics.median(ttft), 3), "p90": round(pct(ttft, 0.9), 3),
                       "max": round(max(ttft), 3)},
            "itl_ms": {"median": round(1e3 * statistics.median(itl), 2), "p90": round(1e3 * pct(itl, 0.9), 2)},
            "per_request_decode_tok_per_s": round(statistics.median(
                (len(s) - 1) / (s[-1] - s[0]) for _, s in res if len(s) > 1), 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "transformers_engine.json"))
    ap.add_argument("--tiny", action="store_true", help="rehearsal: the tiny model on CPU")
    ap.add_argument("--build-model-dir", default=str(ROOT / ".gpu" / "build_model_dir.py"))
    ap.add_argument("--levels", default=None, help="concurrency levels, e.g. 1,8,32")
    ap.add_argument("--out-tokens", type=int, default=None)
    ap.add_argument("--image-side", type=int, default=None, help="pixels (square); 1024 = 1369 image tokens")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--attn", default="auto")
    a = ap.parse_args()
    levels = [int(x) for x in (a.levels or ("1,4" if a.tiny else "1,8,32")).split(",")]
    out_tokens = a.out_tokens or (16 if a.tiny else 256)
    side = a.image_side or (224 if a.tiny else 1024)

    import torch

    from kimivl_inference import transformers_engine as te

    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "flash_attn": te.flash_attn_available()}
    import transformers
    info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    mdir = model_dir(a)
    log("model dir", mdir, info)
    args = SimpleNamespace(model=mdir, device="cpu" if a.tiny else "cuda", dtype="float32" if a.tiny else "bfloat16",
                           preset="auto", max_model_len=None, max_num_seqs=a.max_num_seqs,
                           max_num_batched_tokens=8192, attn_implementation=a.attn,
                           load_format="auto" if a.tiny else "dummy", seed=0, gpu_memory_utilization=None,
                           swap_space=None)
    t = time.perf_counter()
    engine, tok, preset = te.start_transformers_engine(args)
    start_s = time.perf_counter() - t
    log(f"engine started in {start_s:.1f} s, preset {preset and preset.name}")

    grid = -(-side // 28) * 2  # patches a side after padding to 28
    n_img = grid * grid // 4
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image", "image": "x"},
                                                                 {"type": "text", "text": "Describe this picture."}]}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    pad = tok.convert_tokens_to_ids("<|media_pad|>")
    at = ids.index(pad)
    prompt = ids[:at] + [pad] * n_img + ids[at + 1:]
    dtype = engine.model.dtype
    gen = torch.Generator().manual_seed(0)
    images = {}

    def make_input(i):
        if i not in images:  # each request its own picture: random pixels, normalized to [-1, 1]
            images[i] = (torch.rand(grid * grid, 3, 14, 14, generator=gen) * 2 - 1).to(dtype)
        return {"prompt_token_ids": prompt, "pixel_values": images[i],
                "image_grid_hws": torch.tensor([[grid, grid]])}

    async def bench():
        log("warm-up")
        await run_level(engine, make_input, 2, 8)
        results = []
        for n in levels:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            r = await run_level(engine, make_input, n, out_tokens)
            log(json.dumps(r))
            results.append(r)
        return results

    results = asyncio.run(bench())
    report = {
        "what": "Transformers engine (--engine transformers), in-process, greedy, ignore_eos",
        "model": "tiny" if a.tiny else "full-size Kimi-VL-A3B architecture, random N(0,1/fan_in) weights",
        "dtype": str(dtype), "attn_implementation": engine.model.config._attn_implementation,
        "prompt_tokens": len(prompt), "image_tokens": n_img, "image_side_px": side, "output_tokens": out_tokens,
        "max_num_seqs": engine.max_num_seqs, "max_model_len": engine.model_config.max_model_len,
        "preset": preset.name if preset else None, "engine_start_s": round(start_s, 1), "env": info,
        "levels": results,
    }
    if torch.cuda.is_available():
        report["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        report["gpu_peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    engine.shutdown()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    log("wrote", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
