"""Start-up warm-up: the image shapes a fresh inference tier will meet, run through its engine
before it reports SERVING.

A fresh engine is slower at first: Triton and FlashAttention kernels compile on their first
shapes, the fast path's position-embedding cache is empty. For each grid, one request alone
and then a group that fills about one engine step go through the same path as a real
request (the prompt is validated, made an engine input, generated), with raw 8-bit patches
as the front door sends them by default. Their pixels are random and the engine's caches key
them by the identity the tier derives from those pixels (kimivl_contract.identity), so a warm-up
result is never served to a real request; the ``kimivl-warmup:<random>:<n>`` content hash only
labels them in logs.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from kimivl.v1 import inference_pb2, types_pb2
from kimivl_contract.errors import RequestError
from kimivl_contract.prepared import check_prepared_prompt

from .engine_input import build_engine_input
from .generation import GenerationStats, generate

log = logging.getLogger("kimivl.warmup")

HASH_PREFIX = "kimivl-warmup:"
MAX_TOKENS = 4
MAX_GROUP = 8


@dataclass
class WarmupReport:
    requests: int = 0
    seconds: float = 0.0
    skipped: list[str] | None = None


def warmup_prompt(tokenizer, pad_id: int, grid: tuple[int, int], tag: str, seed: int) -> types_pb2.PreparedPrompt:
    """A prompt with one image of ``grid`` (random pixels, uint8), laid out as the front door does."""
    import numpy as np

    h, w = grid
    n = h * w // 4
    start = tokenizer.convert_tokens_to_ids("<|media_start|>")
    end = tokenizer.convert_tokens_to_ids("<|media_end|>")
    head = tokenizer.encode("Warm-up.", add_special_tokens=False) + [start]
    ids = head + [pad_id] * n + [end] + tokenizer.encode(" Describe the image.", add_special_tokens=False)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(h * w, 3, 14, 14), dtype=np.uint8)
    image = types_pb2.PreparedImage(
        grid_height=h, grid_width=w, placeholder_offset=len(head), placeholder_length=n,
        content_hash=f"{HASH_PREFIX}{tag}:{seed}",
        pixel_values=types_pb2.Tensor(dtype=types_pb2.TENSOR_DTYPE_UINT8, shape=[h * w, 3, 14, 14],
                                      data=pixels.tobytes()))
    return types_pb2.PreparedPrompt(token_ids=ids, images=[image])


async def _one(servicer, prompt, rid: str) -> None:
    tensor_data: list[bytes] = []
    image_tokens = check_prepared_prompt(prompt, servicer.limits, tensor_data=tensor_data)
    request = inference_pb2.GenerateRequest(
        prompt=prompt, request_id=rid,
        sampling=types_pb2.SamplingParameters(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    engine_input = await asyncio.to_thread(build_engine_input, prompt, servicer.model_dtype, servicer.normalizer,
                                           tensor_data, servicer.raw_pixels)
    async for _ in generate(servicer.engine, engine_input, request, max_model_len=servicer.limits.max_model_len,
                            end_marker_ids=servicer.end_marker_ids, image_tokens=image_tokens,
                            stats=GenerationStats()):
        pass


async def warm_up(servicer, tokenizer, grids, max_num_batched_tokens: int | None = None) -> WarmupReport:
    """Run the warm-up through ``servicer``'s engine (attached); grids the limits refuse are skipped."""
    report = WarmupReport(skipped=[])
    tag = uuid.uuid4().hex
    t0 = time.perf_counter()
    seed = 0
    for grid in grids:
        name = f"{grid[0]}x{grid[1]}"
        prompt = warmup_prompt(tokenizer, servicer.limits.pad_id, grid, tag, seed)
        try:
            check_prepared_prompt(prompt, servicer.limits)
        except RequestError as e:
            log.warning("warm-up grid %s skipped: %s", name, e)
            report.skipped.append(name)
            continue
        step = max_num_batched_tokens or servicer.limits.max_model_len
        group = max(2, min(MAX_GROUP, step // len(prompt.token_ids) + 1))
        g0 = time.perf_counter()
        await _one(servicer, prompt, f"warmup-{tag}-{seed}")  # alone, then a group that fills a step
        seed += 1
        batch = []
        for _ in range(group):
            batch.append(_one(servicer, warmup_prompt(tokenizer, servicer.limits.pad_id, grid, tag, seed),
                              f"warmup-{tag}-{seed}"))
            seed += 1
        await asyncio.gather(*batch)
        report.requests += 1 + group
        log.info("warm-up grid %s: 1 + %d requests in %.2f s", name, group, time.perf_counter() - g0)
    report.seconds = time.perf_counter() - t0
    return report
