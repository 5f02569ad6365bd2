"""What deriving an image's cache identity costs the inference tier, per request, side by side with
the rest of its per-image work (kimivl_inference.engine_input.build_engine_input).

For a 1 MP and a 12 MP photo (resized by the processor to the token limit), as the front door
sends them (uint8 patches): the tensor's identity (kimivl_contract.identity.tensor_identity:
blake3 of dtype, grid, normalization and bytes), the uint8 normalization, and the whole
build_engine_input, each the median and range of ROUNDS calls, interleaved. Needs torch and vLLM
(the CPU engine's install is enough; nothing is started).

usage: .venv/bin/python bench/identity_cost.py [--rounds N] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from kimivl.v1 import types_pb2
from kimivl_contract.identity import tensor_identity
from kimivl_contract.processor import ProcessorConfig
from kimivl_inference.engine_input import build_engine_input
from kimivl_inference.pixels import PixelNormalizer
from kimivl_preprocess.codec import PromptWire
from kimivl_preprocess.image import preprocess_image_bytes


def photo(megapixels: float) -> bytes:
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import imagedata

    return imagedata.mosaic_jpeg(megapixels)


def prompt_of(jpeg: bytes) -> types_pb2.PreparedPrompt:
    p = preprocess_image_bytes(jpeg, ProcessorConfig(), "uint8")
    pad = 163605
    ids = [1, *[pad] * p.num_tokens, 2]
    return PromptWire.from_images(ids, [p], "uint8", [(1, p.num_tokens)]).message()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    cfg = ProcessorConfig()
    normalizer = PixelNormalizer(cfg.image_mean, cfg.image_std, torch.bfloat16)
    results = {}
    for label, mp in (("1 MP", 1.0), ("12 MP", 12.0)):
        prompt = prompt_of(photo(mp))
        img = prompt.images[0]
        data = img.pixel_values.data
        steps = {
            "identity (blake3)": lambda img=img, data=data: tensor_identity(img, data, normalizer.fingerprint),
            "uint8 normalization": lambda data=data, img=img: normalizer(
                torch.frombuffer(bytearray(data), dtype=torch.uint8).view(*img.pixel_values.shape)),
            "build_engine_input (all)": lambda prompt=prompt, data=data: build_engine_input(
                prompt, torch.bfloat16, normalizer, [data]),
        }
        times = {k: [] for k in steps}
        for _ in range(2):  # warm
            for fn in steps.values():
                fn()
        for _ in range(a.rounds):  # interleaved, so load changes hit every step alike
            for k, fn in steps.items():
                t = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t) * 1e3)
        results[label] = {"grid": [img.grid_height, img.grid_width], "uint8_bytes": len(data),
                          **{k: {"median_ms": round(statistics.median(v), 2), "min_ms": round(min(v), 2),
                                 "max_ms": round(max(v), 2)} for k, v in times.items()}}
    print(f"{'image':<7}{'grid':<10}{'bytes':>11}  " + "  ".join(f"{k:>28}" for k in steps))
    for label, r in results.items():
        cells = [f"{r[k]['median_ms']:7.2f} ms ({r[k]['min_ms']:.2f}-{r[k]['max_ms']:.2f})" for k in steps]
        print(f"{label:<7}{'x'.join(map(str, r['grid'])):<10}{r['uint8_bytes']:>11}  " + "  ".join(
            f"{c:>28}" for c in cells))
        share = r["identity (blake3)"]["median_ms"] / r["build_engine_input (all)"]["median_ms"]
        print(f"         identity = {share:.0%} of build_engine_input")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
