"""The CPU image pipeline against vLLM's own loader and a straightforward Kimi-VL processor.

"Same as vLLM" is checked for real: every decodable case is also loaded with vLLM's
``ImageMediaIO`` and the RGB arrays must be equal. Patches must equal the reference below
(copied from the Kimi-VL processor, torch) bit for bit, in float32 and after casting to the
2-byte wire dtypes.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import pickle
import subprocess
import sys
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

import imagedata
from kimivl_contract.processor import ProcessorConfig, target_size
from kimivl_inference.pixels import PixelNormalizer
from kimivl_preprocess.image import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    load_image,
    preprocess_image_bytes,
    process_image,
)
from kimivl_preprocess.pool import ImagePool

torch = pytest.importorskip("torch")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLIP = ProcessorConfig(image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711))


def reference(image: Image.Image, config: ProcessorConfig = ProcessorConfig()) -> tuple[torch.Tensor, tuple[int, int]]:
    """KimiVLImageProcessor.preprocess_one (processing_kimi_vl.py), straightforwardly."""
    p = config.patch_size
    w, h = image.size
    n = (w // p) * (h // p)
    if n > config.in_token_limit:
        s = math.sqrt(config.in_token_limit / n)
        image = image.resize((int(w * s), int(h * s)), Image.Resampling.BICUBIC)
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    mh, mw = config.merge_kernel_size[0] * p, config.merge_kernel_size[1] * p
    hh, ww = arr.shape[:2]
    arr = np.pad(arr, ((0, (mh - hh % mh) % mh), (0, (mw - ww % mw) % mw), (0, 0)))
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    t = (t - torch.tensor(config.image_mean).view(3, 1, 1)) / torch.tensor(config.image_std).view(3, 1, 1)
    c, hh, ww = t.shape
    patches = t.reshape(c, hh // p, p, ww // p, p).permute(1, 3, 0, 2, 4).reshape(-1, c, p, p)
    return patches, (hh // p, ww // p)


def assert_matches_reference(ours, ref: torch.Tensor, dtype: str) -> None:
    """Bitwise equality with the reference cast to ``dtype`` (float32: also within 1e-6)."""
    expected = ref.to(TORCH_DTYPES[dtype])
    assert ours.pixel_values.shape == tuple(expected.shape)
    assert ours.pixel_values.flags.c_contiguous
    assert str(ours.pixel_values.dtype) == dtype
    if dtype == "float32":
        np.testing.assert_allclose(ours.pixel_values, expected.numpy(), rtol=0, atol=1e-6)
    bits = {2: (torch.int16, np.int16), 4: (torch.int32, np.int32)}[expected.element_size()]
    np.testing.assert_array_equal(ours.pixel_values.view(bits[1]), expected.view(bits[0]).numpy())


@pytest.fixture(scope="module")
def vllm_load():
    from vllm.multimodal.media.image import ImageMediaIO

    return lambda data: ImageMediaIO().load_bytes(data).media


# --- loading: vLLM semantics ------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(imagedata.DECODABLE))
def test_loader_equals_vllm(case, vllm_load):
    data = imagedata.DECODABLE[case]()
    ours, theirs = load_image(data), vllm_load(data)
    assert ours.mode == theirs.mode == "RGB"
    assert ours.size == theirs.size
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("case", sorted(imagedata.REFUSED))
def test_loader_refuses_what_vllm_refuses(case, vllm_load):
    data = imagedata.REFUSED[case]()
    with pytest.raises(ImageError) as err:
        load_image(data)
    assert not err.value.too_large
    with pytest.raises(ValueError):
        vllm_load(data)


def test_unsupported_format_message():
    with pytest.raises(ImageError, match="not an image in a supported format.*not EPS, SVG"):
        load_image(imagedata.eps_bytes())


def test_exif_orientation_is_applied():
    raw = Image.open(BytesIO(imagedata.exif_jpeg(1)))
    for orientation, transpose in ((3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270)):
        ours = load_image(imagedata.exif_jpeg(orientation))
        assert np.array_equal(np.asarray(ours), np.asarray(raw.transpose(transpose)))
    assert load_image(imagedata.exif_jpeg(6)).size == (400, 600)  # coffee is 600x400


def test_transparency_becomes_white():
    alpha = imagedata.rgba_alpha()
    rgb = np.asarray(load_image(imagedata.rgba_png()))
    clear, opaque = alpha == 0, alpha == 255
    assert clear.any() and (rgb[clear] == 255).all()
    assert opaque.any() and np.array_equal(rgb[opaque], imagedata.photo("astronaut")[opaque])
    partial = ~clear & ~opaque
    assert partial.any() and (rgb[partial] >= imagedata.photo("astronaut")[partial]).all()


def test_palette_transparency_becomes_white():
    data = imagedata.palette_trns_png()
    indices = np.asarray(Image.open(BytesIO(data)))
    rgb = np.asarray(load_image(data))
    clear = indices == indices[0, 0]
    assert clear.any() and (rgb[clear] == 255).all()


def test_animated_gif_gives_first_frame():
    first = Image.fromarray(imagedata.photo("chelsea")[:300, :400]).convert("P").convert("RGB")
    assert np.array_equal(np.asarray(load_image(imagedata.animated_gif())), np.asarray(first))


def test_pixel_limit(vllm_load, monkeypatch):
    data = imagedata.png_header_only(100, 100)
    with pytest.raises(ImageError, match=r"image is 100x100 = 10000 pixels, over the limit of 9999") as err:
        load_image(data, max_pixels=9999)
    assert err.value.too_large
    monkeypatch.setenv("VLLM_MAX_IMAGE_PIXELS", "9999")
    with pytest.raises(ValueError, match="exceed the maximum of 9999"):
        vllm_load(data)
    # At the limit the size is fine; this PNG then fails to decode (no pixel data).
    with pytest.raises(ImageError) as err:
        load_image(data, max_pixels=10000)
    assert not err.value.too_large


def test_decompression_bomb_is_too_large():
    with pytest.raises(ImageError, match=f"over the limit of {DEFAULT_MAX_PIXELS} pixels") as err:
        load_image(imagedata.png_header_only(20000, 20000))
    assert err.value.too_large


def test_image_error_survives_pickling():
    err = pickle.loads(pickle.dumps(ImageError("too big", too_large=True)))
    assert isinstance(err, ImageError) and str(err) == "too big" and err.too_large


# --- processing: the Kimi-VL processor -----------------------------------------------------------


PROCESS_CASES = {
    **{name: (lambda n=name: imagedata.photo_jpeg(n)) for name in imagedata.PHOTOS},
    "document": imagedata.document_png,
    "grayscale_L": imagedata.grayscale_png,
    "cmyk": imagedata.cmyk_jpeg,
    "LA": imagedata.la_png,
    **{f"{w}x{h}": (lambda w=w, h=h: imagedata.sized_png(w, h)) for w, h in ((1, 1), (13, 13), (29, 57), (57, 29), (28, 56))},
    "2000x1900": lambda: imagedata.sized_png(2000, 1900),
    "12MP": lambda: imagedata.mosaic_jpeg(12),
}


@pytest.fixture(scope="module")
def loaded():
    return {name: load_image(make()) for name, make in PROCESS_CASES.items()}


@pytest.mark.parametrize("case", sorted(PROCESS_CASES))
def test_patches_equal_reference(case, loaded):
    image = loaded[case]
    ref, grid = reference(image)
    for dtype in ("float32", "bfloat16", "float16"):
        ours = process_image(image, ProcessorConfig(), dtype)
        assert ours.grid_hw == grid
        assert ours.num_tokens == grid[0] * grid[1] // 4
        assert_matches_reference(ours, ref, dtype)


@pytest.mark.parametrize("case", sorted(PROCESS_CASES))
def test_uint8_patches_normalized_by_the_inference_tier_equal_reference(case, loaded):
    """The front door's default wire form: raw pixels, normalized by the inference tier into
    the model dtype, bit for bit the processor's values (one rounding, like vLLM's own path)."""
    image = loaded[case]
    ref, grid = reference(image)
    raw = process_image(image, ProcessorConfig(), "uint8")
    assert raw.grid_hw == grid and raw.pixel_values.dtype == np.uint8 and raw.pixel_values.flags.c_contiguous
    for dtype in ("float32", "bfloat16", "float16"):
        normalize = PixelNormalizer(ProcessorConfig().image_mean, ProcessorConfig().image_std, TORCH_DTYPES[dtype])
        assert normalize.exact
        got = normalize(torch.from_numpy(raw.pixel_values))
        assert got.dtype == TORCH_DTYPES[dtype]
        assert torch.equal(got, ref.to(TORCH_DTYPES[dtype]))
    # The same image in another wire dtype is another tensor: another content hash.
    assert raw.content_hash != process_image(image, ProcessorConfig(), "bfloat16").content_hash


def test_uint8_normalization_per_channel_and_table_fallback(loaded):
    ref, _ = reference(loaded["coffee"], CLIP)
    raw = torch.from_numpy(process_image(loaded["coffee"], CLIP, "uint8").pixel_values)
    normalize = PixelNormalizer(CLIP.image_mean, CLIP.image_std, torch.bfloat16)
    assert torch.equal(normalize(raw), ref.to(torch.bfloat16))
    normalize.exact = False  # the path taken if torch's arithmetic ever disagreed with the reference's
    assert torch.equal(normalize(raw), ref.to(torch.bfloat16))


def read_normalization(model_dir: str) -> tuple:
    config = ProcessorConfig.from_model_dir(model_dir)  # what the inference tier normalizes with
    return config.image_mean, config.image_std


def test_inference_tier_reads_mean_and_std_from_the_model(tmp_path):
    assert read_normalization(str(tmp_path)) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": list(CLIP.image_mean),
                                                                   "image_std": list(CLIP.image_std)}))
    assert read_normalization(str(tmp_path)) == (CLIP.image_mean, CLIP.image_std)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_std": [0.5, 0, 0.5]}))
    with pytest.raises(ValueError, match="std non-zero"):
        read_normalization(str(tmp_path))


def test_large_images_are_resized_to_the_token_limit(loaded):
    for case in ("2000x1900", "12MP"):
        image = loaded[case]
        s = math.sqrt(16384 / ((image.width // 14) * (image.height // 14)))
        w, h = int(image.width * s), int(image.height * s)  # the processor's formula, floors and all
        assert target_size(*image.size, ProcessorConfig()) == (w, h)
        assert process_image(image, ProcessorConfig()).grid_hw == (math.ceil(h / 28) * 2, math.ceil(w / 28) * 2)


@pytest.mark.parametrize(
    ("config", "case"),
    [(CLIP, "coffee"), (CLIP, "29x57"), (ProcessorConfig(in_token_limit=256), "astronaut"),
     (ProcessorConfig(patch_size=15, in_token_limit=300), "rocket"), (ProcessorConfig(patch_size=15), "13x13"),
     (ProcessorConfig(merge_kernel_size=(1, 3)), "29x57")],
)  # fmt: skip
def test_other_configs_equal_reference(config, case, loaded):
    ref, grid = reference(loaded[case], config)
    for dtype in ("float32", "bfloat16"):
        ours = process_image(loaded[case], config, dtype)
        assert ours.grid_hw == grid
        assert_matches_reference(ours, ref, dtype)


@pytest.mark.parametrize(
    ("size", "expected"),
    [((8000, 300), (7168, 268)), ((300, 8000), (268, 7168)), ((7168, 100), (7168, 100)), ((7169, 100), (7168, 99))],
)
def test_over_512_patches_per_side_shrinks_to_fit(size, expected):
    image = imagedata.mosaic(*size)
    assert target_size(*size, ProcessorConfig()) == expected
    out = process_image(image, ProcessorConfig(), "float32")
    assert max(out.grid_hw) == 512
    ref, grid = reference(image.resize(expected, Image.Resampling.BICUBIC) if expected != size else image)
    assert out.grid_hw == grid
    assert_matches_reference(out, ref, "float32")


def test_token_limit_and_side_limit_resize_once():
    w, h = 20000, 1000
    s = math.sqrt(16384 / ((w // 14) * (h // 14)))
    w1, h1 = int(w * s), int(h * s)
    assert w1 > 7168  # the token-limit size alone would still be too wide
    expected = (7168, h1 * 7168 // w1)
    assert target_size(w, h, ProcessorConfig()) == expected
    image = imagedata.mosaic(w, h)
    out = process_image(image, ProcessorConfig(), "float32")
    assert_matches_reference(out, reference(image.resize(expected, Image.Resampling.BICUBIC))[0], "float32")


def test_extreme_aspect_keeps_a_pixel():
    assert target_size(100_000, 10, ProcessorConfig()) == (7168, 1)
    out = process_image(Image.new("RGB", (100_000, 10), (255, 0, 0)), ProcessorConfig(), "float32")
    assert out.grid_hw == (2, 512)
    assert out.pixel_values[0, :, 0, 0].tolist() == [1.0, -1.0, -1.0]  # red, normalized
    assert out.pixel_values[0, :, 1, 0].tolist() == [-1.0, -1.0, -1.0]  # zero padding below row 0


def test_zero_sized_image_is_refused():
    with pytest.raises(ImageError, match="0x5: a side of 0 pixels"):
        process_image(Image.new("RGB", (0, 5)), ProcessorConfig())


def test_bad_arguments():
    image = Image.new("RGB", (20, 20))
    with pytest.raises(ValueError, match="dtype must be one of"):
        process_image(image, ProcessorConfig(), "int8")
    with pytest.raises(ValueError, match="dtype must be one of"):
        preprocess_image_bytes(b"not decoded", ProcessorConfig(), "float64")
    with pytest.raises(ValueError, match="needs an RGB image"):
        process_image(image.convert("L"), ProcessorConfig())


# --- config -------------------------------------------------------------------------------------


def test_config_from_model_dir(tmp_path):
    assert ProcessorConfig.from_model_dir(None) == ProcessorConfig()
    assert ProcessorConfig.from_model_dir(str(tmp_path)) == ProcessorConfig()  # no preprocessor_config.json
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "KimiVLImageProcessor", "in_token_limit": 4096, "merge_kernel_size": [2, 2],
        "patch_size": 14, "pad_input": True, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6],
    }))  # fmt: skip
    config = ProcessorConfig.from_model_dir(str(tmp_path))
    assert config == ProcessorConfig(in_token_limit=4096, image_mean=(0.1, 0.2, 0.3), image_std=(0.4, 0.5, 0.6))
    assert isinstance(config.merge_kernel_size, tuple) and hash(config)
    # JSON ints and floats alike: equal settings, equal content hashes.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0, 0, 1], "image_std": [1, 1, 1]}))
    from_ints = ProcessorConfig.from_model_dir(str(tmp_path))
    from_floats = ProcessorConfig(image_mean=(0.0, 0.0, 1.0), image_std=(1.0, 1.0, 1.0))
    assert from_ints == from_floats and from_ints.fingerprint() == from_floats.fingerprint()


@pytest.mark.parametrize(
    "bad", [{"pad_input": False}, {"image_std": [0.5, 0.0, 0.5]}, {"image_mean": [0.5, 0.5]}, {"patch_size": 0}]
)
def test_config_rejects_unusable_values(tmp_path, bad):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError):
        ProcessorConfig.from_model_dir(str(tmp_path))


# --- content hash -------------------------------------------------------------------------------


def test_content_hash_is_stable_and_distinct(loaded):
    data = imagedata.photo_jpeg("coffee")
    first = preprocess_image_bytes(data, ProcessorConfig()).content_hash
    assert first.startswith("kimivl-img:") and len(first) == len("kimivl-img:") + 64
    assert preprocess_image_bytes(data, ProcessorConfig()).content_hash == first
    results = [preprocess_image_bytes(make(), ProcessorConfig()) for make in imagedata.DECODABLE.values()]
    results += [process_image(loaded[case], ProcessorConfig()) for case in ("28x56", "2000x1900", "12MP")]
    # Same patches, same hash (EXIF orientations 1 and 9 leave the image as it is); different
    # patches, different hashes.
    hashes_by_patches: dict = {}
    for r in results:
        hashes_by_patches.setdefault((r.grid_hw, r.pixel_values.tobytes()), set()).add(r.content_hash)
    assert all(len(h) == 1 for h in hashes_by_patches.values())
    assert len(set.union(*hashes_by_patches.values())) == len(hashes_by_patches) >= len(results) - 2


def test_content_hash_separates_what_the_engine_could_confuse():
    def digest(image, config=ProcessorConfig(), dtype="bfloat16"):
        return process_image(image, config, dtype).content_hash

    pixels = np.array(imagedata.photo("astronaut")[:64, :64])
    base = digest(Image.fromarray(pixels))
    pixels[63, 63, 2] ^= 1  # one bit of one pixel
    assert digest(Image.fromarray(pixels)) != base
    # Same padded tensor, different images: a black 13x13 and a black 14x14 pad to one 28x28.
    small, big = Image.new("RGB", (13, 13)), Image.new("RGB", (14, 14))
    assert np.array_equal(process_image(small, ProcessorConfig()).pixel_values,
                          process_image(big, ProcessorConfig()).pixel_values)  # fmt: skip
    assert digest(small) != digest(big)
    # Same bytes, different shape.
    flat = imagedata.photo("coffee")[:4, :4].reshape(-1, 3)
    assert digest(Image.fromarray(flat.reshape(2, 8, 3))) != digest(Image.fromarray(flat.reshape(8, 2, 3)))
    image = Image.fromarray(imagedata.photo("coffee"))
    assert len({digest(image), digest(image, dtype="float16"), digest(image, dtype="float32"),
                digest(image, CLIP), digest(image, ProcessorConfig(in_token_limit=1024))}) == 5  # fmt: skip


# --- pool ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
async def test_pool_gives_the_inline_results(workers):
    pool = ImagePool(ProcessorConfig(), workers=workers, max_pixels=13_000_000)
    try:
        assert pool.workers == max(workers, 1)
        dtypes = ("bfloat16", "float16", "float32")
        images = [imagedata.photo_jpeg("rocket"), imagedata.sized_png(29, 57), imagedata.mosaic_jpeg(12)]
        results = await asyncio.gather(*(pool.process(d, dt) for d, dt in zip(images, dtypes, strict=True)))
        for data, dtype, got in zip(images, dtypes, results, strict=True):
            want = preprocess_image_bytes(data, ProcessorConfig(), dtype)
            assert (got.grid_hw, got.content_hash, got.num_tokens) == (want.grid_hw, want.content_hash, want.num_tokens)
            assert got.pixel_values.dtype == want.pixel_values.dtype
            assert np.array_equal(got.pixel_values.view(np.uint8), want.pixel_values.view(np.uint8))
        with pytest.raises(ImageError) as err:
            await pool.process(imagedata.garbage_bytes())
        assert not err.value.too_large
        with pytest.raises(ImageError, match="4000x4000 = 16000000 pixels, over the limit of 13000000") as err:
            await pool.process(imagedata.png_header_only(4000, 4000))
        assert err.value.too_large
        with pytest.raises(ValueError, match="dtype must be one of"):
            await pool.process(images[0], "int8")
    finally:
        pool.close()


def test_pool_defaults_to_one_thread_per_cpu():
    pool = ImagePool(ProcessorConfig())
    try:
        assert pool.workers == len(os.sched_getaffinity(0))
    finally:
        pool.close()
    with pytest.raises(ValueError):
        ImagePool(ProcessorConfig(), workers=-1)


async def test_pool_does_not_block_the_event_loop():
    pool = ImagePool(ProcessorConfig(), workers=1)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    try:
        task = asyncio.create_task(ticker())
        await pool.process(imagedata.mosaic_jpeg(12))  # ~0.2 s of work
        task.cancel()
        assert ticks >= 3
    finally:
        pool.close()


# --- kimivl preprocess --------------------------------------------------------------------------

CLI = [sys.executable, "-m", "kimivl_preprocess.preprocess_cli"]


def test_cli_writes_the_reference_arrays(tmp_path):
    files = {"coffee.jpg": imagedata.photo_jpeg("coffee"), "odd.png": imagedata.sized_png(29, 57),
             "logo.png": imagedata.rgba_png()}  # fmt: skip
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    paths = [str(tmp_path / name) for name in files]
    refs = [reference(load_image(data)) for data in files.values()]

    run = subprocess.run([*CLI, *paths, "--out", str(tmp_path / "a.npz")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    with np.load(tmp_path / "a.npz") as z:
        assert z["pixel_values"].dtype == np.float32 and z["image_grid_hws"].dtype == np.int64
        assert np.array_equal(z["pixel_values"], torch.cat([r for r, _ in refs]).numpy())
        assert z["image_grid_hws"].tolist() == [list(g) for _, g in refs]

    model = tmp_path / "model"
    model.mkdir()
    (model / "preprocessor_config.json").write_text(json.dumps({"image_mean": list(CLIP.image_mean),
                                                                 "image_std": list(CLIP.image_std)}))  # fmt: skip
    out = tmp_path / "b.npz"
    run = subprocess.run([*CLI, paths[0], "--model", str(model), "--dtype", "bfloat16", "--out", str(out)],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    with np.load(out) as z:
        expected = reference(load_image(files["coffee.jpg"]), CLIP)[0].to(torch.bfloat16).view(torch.int16)
        assert np.array_equal(z["pixel_values"].view(np.int16), expected.numpy())


@pytest.mark.parametrize("problem", ["missing", "corrupt", "eps"])
def test_cli_reports_an_unusable_image_in_one_line(tmp_path, problem):
    good = tmp_path / "good.jpg"
    good.write_bytes(imagedata.photo_jpeg("chelsea"))
    bad = tmp_path / f"{problem}.img"
    if problem != "missing":
        bad.write_bytes(imagedata.truncated_jpeg() if problem == "corrupt" else imagedata.eps_bytes())
    out = tmp_path / "out.npz"
    run = subprocess.run([*CLI, str(good), str(bad), "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 2
    reason = {"missing": "No such file or directory", "corrupt": "cannot decode image: image file is truncated",
              "eps": "not an image in a supported format"}[problem]  # fmt: skip
    assert run.stderr.startswith(f"kimivl preprocess: {bad}: {reason}")
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert not out.exists()
