"""Benchmark of the preprocessing tier's image pipeline (``make bench-preprocess``).

Per image (real-photo mosaics, JPEG q90, 0.3-12 MP, and a PNG document page), timed side by
side in interleaved rounds so that a noisy machine hurts all three alike (median of rounds):

  floor      Pillow decode alone: ``Image.open(...).convert("RGB")`` (+ load)
  reference  the Kimi-VL processor's steps written straightforwardly in numpy (float32
             image, pad, normalize, patchify) and cast to bfloat16: the seed's way
  ours       ``preprocess_image_bytes(data, config, "bfloat16")``
  ours uint8 ``preprocess_image_bytes(data, config, "uint8")``: the raw patches the front door
             sends by default (the inference tier normalizes them)

and checks ours == reference bit for bit on every image (uint8: after the normalization). Then images/s on a mixed batch with
the pipeline inline, in ImagePool (threads) and, for comparison, in a pool of worker
processes (forkserver; patches returned as bytes and rebuilt with np.frombuffer).
Prints markdown for docs/benchmarks.md. Needs only the preprocess + dev extras (no torch).
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from io import BytesIO
from pathlib import Path

import ml_dtypes
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import imagedata  # noqa: E402
from kimivl_contract.processor import ProcessorConfig, normalized_values, target_size  # noqa: E402
from kimivl_preprocess.image import preprocess_image_bytes  # noqa: E402
from kimivl_preprocess.pool import ImagePool  # noqa: E402

ROUNDS = 7


def floor(data: bytes) -> Image.Image:
    image = Image.open(BytesIO(data)).convert("RGB")
    image.load()
    return image


def reference(data: bytes, config: ProcessorConfig) -> np.ndarray:
    """processing_kimi_vl.py's steps, in numpy, to bfloat16 (these images are plain RGB)."""
    image = floor(data)
    p = config.patch_size
    w, h = image.size
    n = (w // p) * (h // p)
    if n > config.in_token_limit:
        s = math.sqrt(config.in_token_limit / n)
        image = image.resize((int(w * s), int(h * s)), Image.Resampling.BICUBIC)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    mh, mw = (m * p for m in config.merge_kernel_size)
    arr = np.pad(arr, ((0, -arr.shape[0] % mh), (0, -arr.shape[1] % mw), (0, 0)))
    arr = (arr - np.float32(config.image_mean)) / np.float32(config.image_std)
    hh, ww, c = arr.shape
    patches = arr.reshape(hh // p, p, ww // p, p, c).transpose(0, 2, 4, 1, 3).reshape(-1, c, p, p)
    return patches.astype(ml_dtypes.bfloat16)


def images() -> list[tuple[str, bytes]]:
    out = [(f"photo {mp} MP JPEG", imagedata.mosaic_jpeg(mp)) for mp in (0.3, 1, 2, 5, 12)]
    out.append(("document 1600x1200 PNG", imagedata.document_png(1600, 1200)))
    return out


def per_image(config: ProcessorConfig) -> list[str]:
    rows = [
        "| image | pixels | sent as | floor ms | reference ms | ours ms | ours uint8 ms | of which resize ms |"
        " ours/floor | ours uint8/floor | ours/reference |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, data in images():
        image = floor(data)
        size = target_size(*image.size, config)
        ours = preprocess_image_bytes(data, config, "bfloat16")
        ref = reference(data, config)
        if not np.array_equal(ours.pixel_values.view(np.uint16), ref.view(np.uint16)):
            raise SystemExit(f"MISMATCH on {name}: ours != reference cast to bfloat16")
        raw = preprocess_image_bytes(data, config, "uint8").pixel_values  # normalized by the inference tier
        table = normalized_values(config.image_mean, config.image_std).astype(ml_dtypes.bfloat16)
        if not np.array_equal(table[np.arange(3)[None, :, None, None], raw].view(np.uint16), ref.view(np.uint16)):
            raise SystemExit(f"MISMATCH on {name}: uint8 patches, normalized, != reference")
        resize = partial(image.resize, size, Image.Resampling.BICUBIC) if size != image.size else None
        runs = {
            "floor": partial(floor, data),
            "reference": partial(reference, data, config),
            "ours": partial(preprocess_image_bytes, data, config, "bfloat16"),
            "uint8": partial(preprocess_image_bytes, data, config, "uint8"),
            **({"resize": resize} if resize else {}),
        }
        timings: dict[str, list[float]] = {key: [] for key in runs}
        for _ in range(ROUNDS):
            for key, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                timings[key].append((time.perf_counter() - t0) * 1e3)
        ms = {k: statistics.median(v) for k, v in timings.items()}
        resize_ms = f"{ms['resize']:.1f}" if resize else "-"
        rows.append(
            f"| {name} | {image.width}x{image.height} | {size[0]}x{size[1]} | {ms['floor']:.1f} |"
            f" {ms['reference']:.1f} | {ms['ours']:.1f} | {ms['uint8']:.1f} | {resize_ms} |"
            f" {ms['ours'] / ms['floor']:.2f} | {ms['uint8'] / ms['floor']:.2f} | {ms['ours'] / ms['reference']:.2f} |"
        )
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def _in_worker(data: bytes) -> tuple[bytes, tuple[int, ...], tuple[int, int], str]:
    out = preprocess_image_bytes(data, ProcessorConfig())
    return out.pixel_values.tobytes(), out.pixel_values.shape, out.grid_hw, out.content_hash


async def _rate(submit, batch: list[bytes], warm: int) -> float:
    await asyncio.gather(*(submit(d) for d in batch[:warm]))  # threads/processes up
    t0 = time.perf_counter()
    await asyncio.gather(*(submit(d) for d in batch))
    return len(batch) / (time.perf_counter() - t0)


async def _threads(config: ProcessorConfig, n: int, batch: list[bytes]) -> float:
    pool = ImagePool(config, workers=n)
    try:
        return await _rate(pool.process, batch, 2 * n)
    finally:
        pool.close()


async def _processes(n: int, batch: list[bytes]) -> float:
    """The alternative ImagePool does not take: worker processes, patches back as bytes."""
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("forkserver")) as pool:

        async def submit(data: bytes) -> np.ndarray:
            raw, shape, _, _ = await loop.run_in_executor(pool, _in_worker, data)
            return np.frombuffer(raw, ml_dtypes.bfloat16).reshape(shape)

        return await _rate(submit, batch, 2 * n)


def throughput(config: ProcessorConfig) -> tuple[list[str], int]:
    cpus = len(os.sched_getaffinity(0))
    mix = [imagedata.mosaic_jpeg(mp) for mp in (0.3, 1, 2, 5)] + [imagedata.photo_jpeg(n) for n in imagedata.PHOTOS]
    batch = mix * max(4, cpus)
    t0 = time.perf_counter()
    for data in batch:
        preprocess_image_bytes(data, config)
    inline = len(batch) / (time.perf_counter() - t0)
    rows = ["| workers | ImagePool (threads) images/s | worker processes images/s |", "|---:|---:|---:|",
            f"| none: inline, one thread | {inline:.1f} | |"]  # fmt: skip
    print(rows[-1], file=sys.stderr, flush=True)
    for n in sorted({n for n in (1, 2, 4, 8, 16, 32) if n < cpus} | {cpus}):
        threads = asyncio.run(_threads(config, n, batch))
        processes = asyncio.run(_processes(n, batch))
        rows.append(f"| {n} | {threads:.1f} | {processes:.1f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows, len(batch)


def main() -> None:
    config = ProcessorConfig()
    print(f"# {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs,"
          f" Python {platform.python_version()}, Pillow {Image.__version__}, numpy {np.__version__}")
    print(f"\nPer image, bfloat16 output, median of {ROUNDS} interleaved rounds:\n")
    print("\n".join(per_image(config)))
    rows, n = throughput(config)
    print(f"\nThroughput on a mixed batch of {n} JPEGs (0.3-5 MP mosaics and the four photos), bfloat16:\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
