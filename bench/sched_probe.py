"""Does vLLM's scheduler batch our ready-tensor requests as it batches its own?

A backlog of N distinct 1600x1200 pages (the documents workload's size) goes into one AsyncLLM
twice: once as the tiers send it (the front door's pipeline, then the inference tier's
build_engine_input) and once through vLLM's own processor (prompt text + PIL image). The
scheduler is wrapped in the engine core process and prints, per step, the tokens and encoder
inputs it scheduled. Equal rows mean the engine treats both alike; a serving difference between
ours and `vllm serve` then comes from when requests reach the engine, not from what they are.

usage: python bench/sched_probe.py [--model DIR] [--pages N]   (CPU: ~1 min after engine start)
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTION = "What does this page say?"
# A minimal Kimi-VL chat prompt around one image (the front door renders the model's full
# template, a few tokens longer: the token counts differ by that, not by the image).
VLLM_PROMPT = ("<|im_user|>user<|im_middle|><|media_start|>image<|media_content|><|media_pad|><|media_end|>"
               f"{QUESTION}<|im_end|><|im_assistant|>assistant<|im_middle|>")


def _wrap_scheduler() -> None:
    """Print each step's schedule. Runs at import, so also in the engine core process, which
    imports this module as __mp_main__."""
    from vllm.v1.core.sched import scheduler

    original = scheduler.Scheduler.schedule

    def schedule(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out.num_scheduled_tokens:
            prefills = sorted((v for v in out.num_scheduled_tokens.values() if v > 1), reverse=True)
            encoder = sum(len(v) for v in (out.scheduled_encoder_inputs or {}).values())
            print(f"STEP tokens={sum(out.num_scheduled_tokens.values())} prefill_chunks={prefills} "
                  f"encoder_inputs={encoder} running={len(self.running)} waiting={len(self.waiting)}", flush=True)
        return out

    scheduler.Scheduler.schedule = schedule


def pages(n: int, seed: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    out = []
    for i in range(n):  # noise: every page distinct, nothing for the prefix or encoder caches to share
        a = np.random.default_rng(seed + i).integers(0, 255, (1200, 1600, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


async def run(model: str, n: int) -> None:
    import torch
    from PIL import Image
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from kimivl.client import build_request
    from kimivl_contract.processor import ProcessorConfig
    from kimivl_inference.engine_input import build_engine_input
    from kimivl_preprocess.pipeline import Preprocessor
    from kimivl_preprocess.pool import ImagePool
    from kimivl_preprocess.sources import FetchPolicy, ImageFetcher

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=model, dtype="bfloat16", enforce_eager=True, max_model_len=8192, max_num_batched_tokens=8192,
        max_num_seqs=256, limit_mm_per_prompt={"image": 8}, seed=0, trust_remote_code=True,
        enable_prefix_caching=True, mm_processor_cache_gb=0))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    async def backlog(label: str, prompts: list) -> None:
        print(f"== {label}: {len(prompts)} pages submitted at once", flush=True)

        async def one(prompt, i):
            async for _ in engine.generate(prompt, params, f"{label[:4]}-{i}"):
                pass

        await asyncio.gather(*(one(p, i) for i, p in enumerate(prompts)))
        await asyncio.sleep(0.5)  # let the engine core's last lines through

    pre = Preprocessor(model, ImagePool(ProcessorConfig.from_model_dir(model), workers=2),
                       ImageFetcher(FetchPolicy()), max_images=8, max_model_len=8192)
    ours = [build_engine_input((await pre.prepare(build_request([b, QUESTION]), "bfloat16")).prompt.message(),
                               torch.bfloat16) for b in pages(n, 1000)]
    await backlog("ours (front door pipeline + build_engine_input)", ours)
    theirs = [{"prompt": VLLM_PROMPT, "multi_modal_data": {"image": Image.open(io.BytesIO(b)).convert("RGB")}}
              for b in pages(n, 2000)]
    await backlog("vLLM's own processor", theirs)
    engine.shutdown()


_wrap_scheduler()

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "kimi-vl-tiny"))
    ap.add_argument("--pages", type=int, default=8)
    a = ap.parse_args()
    sys.exit(asyncio.run(run(a.model, a.pages)))
