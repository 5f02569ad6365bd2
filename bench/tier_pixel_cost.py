"""The inference tier's own cost of one image, fast path on vs off, side by side on this CPU.

``build_engine_input`` for a prepared 1024x1024 image sent as raw 8-bit patches (the front door's
default): with the fast path off the tier normalizes them to bfloat16 on its CPU and hands the engine
6.4 MB; on, it hands over the 3.2 MB of bytes as they are (the GPU normalizes them). Repeats are
interleaved (off, on, off, on, ...); medians and spread per mode.

  .venv/bin/python bench/tier_pixel_cost.py [--grid 74x74] [--threads 1] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from kimivl.v1 import types_pb2
from kimivl_inference.engine_input import build_engine_input
from kimivl_inference.pixels import PixelNormalizer


def prompt(h: int, w: int) -> tuple[types_pb2.PreparedPrompt, bytes]:
    data = np.random.default_rng(0).integers(0, 256, (h * w, 3, 14, 14), dtype=np.uint8).tobytes()
    n = h * w // 4
    img = types_pb2.PreparedImage(grid_height=h, grid_width=w, placeholder_offset=3, placeholder_length=n,
                                  content_hash="x", pixel_values=types_pb2.Tensor(
                                      dtype=types_pb2.TENSOR_DTYPE_UINT8, shape=[h * w, 3, 14, 14], data=data))
    return types_pb2.PreparedPrompt(token_ids=[1, 2, 3] + [9] * n + [4], images=[img]), data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="74x74")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the tier's tensor work")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    h, w = (int(x) for x in a.grid.split("x"))
    p, data = prompt(h, w)
    norm = PixelNormalizer((0.5,) * 3, (0.5,) * 3, torch.bfloat16)
    ms: dict[bool, list[float]] = {False: [], True: []}
    sent = {}
    for _ in range(a.rounds):
        for raw in (False, True):
            t = time.perf_counter()
            for _ in range(a.per_round):
                e = build_engine_input(p, torch.bfloat16, norm, [data], raw_pixels=raw)
            ms[raw].append(1e3 * (time.perf_counter() - t) / a.per_round)
            item = e["mm_kwargs"]["image"][0]
            x = next(v.data for k, v in item.items() if k != "image_grid_hws")
            sent[raw] = f"{x.dtype}, {x.numel() * x.element_size() / 1e6:.2f} MB"
    for raw, label in ((False, "fast path off"), (True, "fast path on ")):
        xs = ms[raw]
        print(f"{label}: {statistics.median(xs):7.2f} ms per image (min {min(xs):.2f}, max {max(xs):.2f}; "
              f"{a.threads} thread(s), grid {a.grid}); handed to the engine: {sent[raw]}")
    print(f"ratio off/on: {statistics.median(ms[False]) / statistics.median(ms[True]):.1f}x")


if __name__ == "__main__":
    main()
