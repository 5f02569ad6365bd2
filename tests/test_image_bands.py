"""Image work in abandonable steps gives the bytes of the one-call reference, and stops when asked.

The reference for resizing is what vLLM's path does: RGB conversion, then one Pillow BICUBIC
resize. The banded version (kimivl_preprocess.resize_bands) must equal it on every mode and on
shapes where either pass comes first.
"""
from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

import imagedata
from kimivl_contract.processor import ProcessorConfig, target_size
from kimivl_preprocess import image as image_mod
from kimivl_preprocess import resize_bands
from kimivl_preprocess.cancel import Abandoned, CancelToken
from kimivl_preprocess.image import decode, load_image, open_image, preprocess_image_bytes, process_image


def test_the_pass_order_of_this_pillow_is_known():
    assert resize_bands.ORDER_RULE is not None, "banded resizes would fall back to one call"


def _random(mode: str, w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode in ("P", "PT"):  # PT: a palette with a transparent index
        p = Image.fromarray(rng.integers(0, 64, (h, w), dtype=np.uint8), "P")
        p.putpalette(rng.integers(0, 256, 64 * 3, dtype=np.uint8).tolist())
        if mode == "PT":
            p.info["transparency"] = 3
        return p
    if mode == "1":
        return rgba.convert("L").point(lambda v: 255 if v > 127 else 0).convert("1")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    return rgba.convert(mode)


SHAPES = [  # (w, h) -> (tw, th): horizontal first, vertical first, one axis only, tiny bands
    ((900, 700), (500, 400)), ((300, 2000), (280, 1200)), ((2000, 300), (1200, 280)),
    ((640, 480), (640, 300)), ((640, 480), (300, 480)), ((37, 1500), (36, 1001)), ((1500, 37), (1001, 36)),
    ((1000, 1000), (1000, 999)), ((999, 1000), (1000, 999)), ((50, 40), (120, 90)),
]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "PT", "1", "CMYK", "I;16", "YCbCr"])
@pytest.mark.parametrize(("size", "target"), SHAPES)
def test_banded_resize_equals_one_call(monkeypatch, mode, size, target):
    monkeypatch.setattr(resize_bands, "BAND_PIXELS", 7919)  # many bands, ragged last one
    image = _random(mode, *size)
    want = image_mod._to_rgb(image).resize(target, Image.Resampling.BICUBIC)
    got = image_mod.rgb_at_size(image, target)
    assert got.mode == "RGB" and got.size == target
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("size", [(13000, 300), (300, 13000), (4000, 3000), (7169, 100)])
def test_banded_resize_at_the_processor_sizes(size):
    image = _random("RGB", *size, seed=1)
    target = target_size(*size, ProcessorConfig())
    assert image_mod.rgb_at_size(image, target).tobytes() == image.resize(target, Image.Resampling.BICUBIC).tobytes()


def test_bytes_to_patches_unchanged_by_the_steps():
    for data in (imagedata.photo_jpeg("coffee"), imagedata.rgba_png(), imagedata.palette_trns_png(),
                 imagedata.cmyk_jpeg(), imagedata.gray16_png(), imagedata.exif_jpeg(6), imagedata.mosaic_jpeg(6)):
        want = process_image(load_image(data), ProcessorConfig(), "uint8")
        got = preprocess_image_bytes(data, ProcessorConfig(), "uint8")
        assert got.grid_hw == want.grid_hw and got.content_hash == want.content_hash
        assert np.array_equal(got.pixel_values, want.pixel_values)


def _bomb_png(side: int = 13000) -> bytes:
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG")
    return buf.getvalue()


def test_the_header_tells_the_size_without_decoding():
    data = _bomb_png()
    assert len(data) < 40_000
    t0 = time.perf_counter()
    image = open_image(data)
    assert image.size == (13000, 13000) and image.mode == "1"
    estimate = image_mod.memory_estimate(image, ProcessorConfig(), "uint8")
    assert 169_000_000 < estimate < 1_000_000_000
    assert image._im is None  # nothing decoded: not by the header, not by the estimate (a PNG's getexif would)
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("stage", ["decode", "resize"])
def test_a_cancelled_image_stops_within_a_step(stage):
    """Decoding and resizing a 13000x13000 image take seconds; cancelled, the work ends soon after."""
    data = _bomb_png()
    token = CancelToken()
    outcome = {}

    def work():
        try:
            image = decode(open_image(data, cancel=token), token)
            outcome["decoded"] = time.perf_counter()
            image_mod.rgb_at_size(image, target_size(*image.size, ProcessorConfig()), token)
            outcome["done"] = True
        except Abandoned:
            outcome["abandoned"] = time.perf_counter()

    t = threading.Thread(target=work)
    t.start()
    if stage == "resize":
        deadline = time.monotonic() + 30
        while "decoded" not in outcome and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "decoded" in outcome
        time.sleep(0.3)
    else:
        time.sleep(0.1)
    cancelled = time.perf_counter()
    token.cancel()
    t.join(10)
    assert not t.is_alive() and "abandoned" in outcome, outcome
    assert outcome["abandoned"] - cancelled < 1.0
