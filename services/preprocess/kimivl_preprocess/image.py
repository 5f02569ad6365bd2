"""Images in, Kimi-VL patches out: vLLM's loader and the Kimi-VL processor, exactly, on CPU.

What the engine receives must be bit-for-bit what vLLM's OpenAI server would have given the
model, so both halves copy their reference step by step:

* Loading mirrors ``vllm.multimodal.media.image.ImageMediaIO.load_bytes``: the same format
  allowlist (no EPS/WMF/stub drivers), the same pixel limit, EXIF orientation applied with
  errors ignored, and the same RGB conversion (transparency composited on white; animated
  images give their first frame).
* Processing mirrors the Kimi-VL image processor: above ``in_token_limit`` patches the image
  is scaled by ``sqrt(limit / patches)`` with Pillow's BICUBIC; it is zero-padded bottom/right
  to a multiple of ``merge_kernel_size * patch_size``; values are ``(x/255 - mean) / std`` in
  float32, cast once (round to nearest even) to the wire dtype; patches are laid out
  ``(grid_h * grid_w, 3, patch, patch)`` in row-major grid order.

Deliberate deviation: the vision tower's 2-D position embedding covers at most
``max_grid_side`` (512) patches per side and vLLM fails on a longer image. We instead shrink
such an image to fit (same factor on both sides, one Pillow BICUBIC resize from the original
to the final size), so an 8000x300 panorama is served instead of refused. Sides that would
round to 0 pixels in either resize are kept at 1 (the reference would fail there too).

Cost is bounded before it is spent, and stops when the request ends: :func:`open_image` reads
only the header (size and mode, so the pixel limits and the token count are known before any
decoding), and the work that follows checks a :class:`~kimivl_preprocess.cancel.CancelToken`
between steps: between decoder input blocks (16 KiB of compressed input each, so a 20 KB
PNG that declares 13000x13000 is decoded in a few pieces) and between bands of the RGB
conversion and resize (:mod:`.resize_bands`: the same bytes as one call). The bands also keep
memory to about the source image plus the once-narrowed one (no full-size RGB copy).

Speed: every output value depends on exactly one input byte, so normalization and the dtype
cast are a lookup table computed once with the reference's float32 arithmetic and the wire
dtype's own cast (ml_dtypes for bfloat16). Pillow extracts each colour plane in C, numpy
regroups 14-byte patch rows into patch order (zeros where padded), and then, band by band so
the indices stay in cache, one ``np.take`` maps *pairs* of bytes (a 65536-entry table)
straight into the output: no float image is ever materialized. The "uint8" wire dtype (the
front door's default) stops before the lookup: the inference tier normalizes the raw patches.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO

import blake3
import ml_dtypes
import numpy as np
from PIL import ExifTags, Image, ImageOps

from kimivl_contract import dtypes
from kimivl_contract.processor import ProcessorConfig, grid_size, normalized_values, target_size

from . import resize_bands
from .cancel import CancelToken

# vllm.multimodal.image.ALLOWED_IMAGE_FORMATS (vLLM 0.32): in-process raster decoders only.
ALLOWED_IMAGE_FORMATS: tuple[str, ...] = (
    "AVIF", "BLP", "BMP", "CUR", "DCX", "DDS", "DIB", "FITS", "FLI", "FTEX", "GBR", "GIF",
    "ICNS", "ICO", "IM", "IMT", "IPTC", "JPEG", "JPEG2000", "MCIDAS", "MSP", "PCD", "PCX",
    "PIXAR", "PNG", "PPM", "PSD", "QOI", "SGI", "SPIDER", "SUN", "TGA", "TIFF", "WEBP", "XBM",
    "XPM", "XVTHUMB",
)  # fmt: skip

# vLLM's default VLLM_MAX_IMAGE_PIXELS (also twice Pillow's decompression-bomb warning level).
DEFAULT_MAX_PIXELS = 178_956_970

# "uint8": the raw pixel values in patch layout, left for the inference tier to normalize
# (half the bytes of bfloat16 on the wire; see TENSOR_DTYPE_UINT8 in the contract).
WIRE_DTYPES = dtypes.NAMES

_TURNING_ORIENTATIONS = frozenset(range(2, 9))  # EXIF orientations exif_transpose acts on
_DECODER_BLOCK = 16 << 10  # compressed bytes per decoder call: a cancellation check between calls
_BAND_LOOKUPS = 1 << 17  # table lookups per band: a band's index array (1 MiB) stays in cache
_HASH_VERSION = b"kimivl-img/1"


class ImageError(ValueError):
    """An image the service cannot take; the message is meant for the user.

    ``too_large`` tells a server to answer RESOURCE_EXHAUSTED rather than INVALID_ARGUMENT;
    it survives pickling (BaseException pickles ``__dict__``), e.g. across a process pool.
    """

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


@dataclass
class ProcessedImage:
    """One image as the engine takes it."""

    pixel_values: np.ndarray  # (N, 3, patch, patch), wire dtype (uint8: not normalized), C-contiguous
    grid_hw: tuple[int, int]  # patch rows, patch columns (both multiples of the merge kernel)
    content_hash: str  # "kimivl-img:" + blake3 hex of config, dtype, size and pixels
    merge_kernel_size: tuple[int, int] = (2, 2)

    @property
    def num_tokens(self) -> int:
        """Placeholder tokens the image takes in the prompt."""
        mh, mw = self.merge_kernel_size
        return self.grid_hw[0] * self.grid_hw[1] // (mh * mw)


class _Input(BytesIO):
    """The encoded bytes, checking the request's cancel token on every read by the decoder."""

    def __init__(self, data: bytes, cancel: CancelToken | None):
        super().__init__(data)
        self._cancel = cancel

    def read(self, *args):
        if self._cancel is not None:
            self._cancel.check()
        return super().read(*args)


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               cancel: CancelToken | None = None) -> Image.Image:
    """Read the header only (format allowlist and pixel limit as vLLM's loader): a lazy image
    whose ``size`` and ``mode`` are known and whose pixels are not yet decoded."""
    try:
        image = Image.open(_Input(data, cancel), formats=ALLOWED_IMAGE_FORMATS)
    except Image.DecompressionBombError:
        bomb = 2 * Image.MAX_IMAGE_PIXELS
        limit = min(max_pixels, bomb) if max_pixels > 0 else bomb
        raise ImageError(f"image is too large: over the limit of {limit} pixels", too_large=True) from None
    except Image.UnidentifiedImageError:
        raise ImageError(
            "not an image in a supported format (JPEG, PNG, WEBP, GIF, BMP, TIFF, AVIF and"
            f" {len(ALLOWED_IMAGE_FORMATS) - 7} other raster formats; not EPS, SVG or WMF)"
        ) from None
    except Exception as e:  # noqa: BLE001 - any decoder failure on untrusted bytes is the input's fault
        raise ImageError(f"cannot read image: {_reason(e)}") from None
    w, h = image.size
    if max_pixels > 0 and w * h > max_pixels:
        raise ImageError(
            f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}", too_large=True
        )
    if min(w, h) < 1:
        raise ImageError(f"image is {w}x{h}: a side of 0 pixels")
    image.decodermaxblock = _DECODER_BLOCK
    return image


def decode(image: Image.Image, cancel: CancelToken | None = None) -> Image.Image:
    """Decode an :func:`open_image` image and apply its EXIF orientation (vLLM's order and error
    handling); its mode is the file's (see :func:`to_rgb`)."""
    try:
        with suppress(Exception):
            # = vLLM's ``ImageOps.exif_transpose(image)``, whose errors it ignores too, without the
            # full copy of the pixels it returns when there is nothing to turn (most images).
            image.load()
            if image.getexif().get(ExifTags.Base.Orientation, 1) in _TURNING_ORIENTATIONS:
                if cancel is not None:
                    cancel.check()
                image = ImageOps.exif_transpose(image)
        image.load()
        return image
    except MemoryError:
        raise ImageError("not enough memory to decode the image", too_large=True) from None
    except Exception as e:  # noqa: BLE001 - truncated/corrupt data surfaces here
        raise ImageError(f"cannot decode image: {_reason(e)}") from None


def load_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode to RGB exactly as vLLM's ``ImageMediaIO.load_bytes`` (max_pixels <= 0: no limit)."""
    image = decode(open_image(data, max_pixels=max_pixels))
    try:
        return _to_rgb(image)
    except MemoryError:
        raise ImageError("not enough memory to decode the image", too_large=True) from None
    except Exception as e:  # noqa: BLE001
        raise ImageError(f"cannot decode image: {_reason(e)}") from None


def _reason(error: Exception) -> str:
    """A decoder's complaint, short and escaped (some quote bytes of the file)."""
    text = str(error) or type(error).__name__
    text = "".join(c if c.isprintable() else "?" for c in text[:200])
    return text if len(str(error)) <= 200 else text + "…"


def rgb_at_size(image: Image.Image, size: tuple[int, int], cancel: CancelToken | None = None) -> Image.Image:
    """= ``_to_rgb(image).resize(size, BICUBIC)`` byte for byte (``image`` decoded, any mode), in
    bands that check ``cancel`` (:mod:`.resize_bands`)."""
    return resize_bands.resize(image, size, _to_rgb, cancel)


def _to_rgb(image: Image.Image) -> Image.Image:
    """vLLM's ``convert_image_mode(image, "RGB")``: transparent pixels become white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.split()[3])
        return rgb
    return image.convert("RGB")


def process_image(image: Image.Image, config: ProcessorConfig, dtype: str = "bfloat16",
                  cancel: CancelToken | None = None) -> ProcessedImage:
    """Run the Kimi-VL processor on an RGB image (from :func:`load_image`)."""
    numpy_dtype(dtype)
    if image.mode != "RGB":
        raise ValueError(f"process_image needs an RGB image, got mode {image.mode}")
    if min(image.size) < 1:  # Pillow's decoders refuse these; a caller-made image may not
        raise ImageError(f"image is {image.width}x{image.height}: a side of 0 pixels")
    size = target_size(*image.size, config)
    if size != image.size:
        image = rgb_at_size(image, size, cancel)
    return _patches(image, config, dtype)


def process_decoded(image: Image.Image, config: ProcessorConfig, dtype: str = "bfloat16",
                    cancel: CancelToken | None = None) -> ProcessedImage:
    """The processor on a :func:`decode`-d image of any mode (the RGB conversion is done in bands
    with the resize, never as a full-size copy)."""
    numpy_dtype(dtype)
    size = target_size(*image.size, config)
    try:
        rgb = rgb_at_size(image, size, cancel)
    except MemoryError:
        raise ImageError("not enough memory to decode the image", too_large=True) from None
    except Exception as e:  # noqa: BLE001 - conversion of untrusted pixels
        raise ImageError(f"cannot decode image: {_reason(e)}") from None
    return _patches(rgb, config, dtype)


def _patches(image: Image.Image, config: ProcessorConfig, dtype: str) -> ProcessedImage:
    """Patches of an RGB image already at its target size."""
    wire = numpy_dtype(dtype)
    w, h = image.size
    p = config.patch_size
    mh, mw = config.merge_kernel_size
    gh = -(-h // (mh * p)) * mh
    gw = -(-w // (mw * p)) * mw
    hasher = blake3.blake3(b"%s|%s|%s|%d,%d|" % (_HASH_VERSION, config.fingerprint(), dtype.encode(), w, h))
    # patches[row, col, channel, y] holds the p bytes of one patch row; zero where padded.
    patch_row = np.dtype(f"V{p}")
    patches = np.empty((gh, gw, 3, p), patch_row)
    pixels = patches.view(np.uint8).reshape(gh, gw, 3, p, p)
    fh, fw = h // p, w // p  # whole patches inside the image
    rh, rw = h - fh * p, w - fw * p  # rows/columns of the partial last patch row/column
    pixels[fh:] = 0
    pixels[:fh, fw:] = 0
    for c, name in enumerate("RGB"):
        raw = image.tobytes("raw", name)  # one colour plane, deinterleaved by Pillow in C
        hasher.update(raw)
        plane = np.frombuffer(raw, np.uint8).reshape(h, w)
        patches[:fh, :fw, c] = plane[: fh * p, : fw * p].view(patch_row).reshape(fh, p, fw).transpose(0, 2, 1)
        if rw:
            pixels[:fh, fw, c, :, :rw] = plane[: fh * p, fw * p :].reshape(fh, p, rw)
        if rh:
            pixels[fh, :fw, c, :rh] = plane[fh * p :, : fw * p].reshape(rh, fw, p).transpose(1, 0, 2)
            if rw:
                pixels[fh, fw, c, :rh, :rw] = plane[fh * p :, fw * p :]
    if wire == np.uint8:  # raw pixels: the inference tier normalizes them
        return ProcessedImage(pixels.reshape(gh * gw, 3, p, p), (gh, gw), "kimivl-img:" + hasher.hexdigest(),
                              config.merge_kernel_size)
    table, offsets = _pair_table(config, dtype)
    unit = 2 if p * p % 2 == 0 else 1  # bytes per lookup; a pair never straddles two channels
    codes = pixels.view(f"u{unit}").reshape(gh, gw, 3, -1)
    out = np.empty(codes.shape, table.dtype)
    band = max(1, _BAND_LOOKUPS // codes[0].size)  # patch rows per band: indices stay in cache
    idx = np.empty((min(band, gh), *codes.shape[1:]), np.intp)
    for r0 in range(0, gh, band):
        n = min(band, gh - r0)
        np.copyto(idx[:n], codes[r0 : r0 + n])
        if offsets is not None:
            idx[:n] += offsets
        np.take(table, idx[:n], out=out[r0 : r0 + n], mode="clip")
    pixel_values = out.view(wire).reshape(gh * gw, 3, p, p)
    return ProcessedImage(pixel_values, (gh, gw), "kimivl-img:" + hasher.hexdigest(), config.merge_kernel_size)


# Bytes per pixel of Pillow's in-memory images by mode (the rest, e.g. RGB, RGBA, CMYK, I, F: 4).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


def memory_estimate(image: Image.Image, config: ProcessorConfig, dtype: str) -> int:
    """Bytes an :func:`open_image` image holds at the peak of :func:`process_decoded`: the decoded
    source (twice if EXIF turns it), the image narrowed by the first resize pass, the resized RGB
    image, two bands in flight and the patches."""
    w, h = image.size
    source = w * h * _MODE_BYTES.get(image.mode, 4)
    if _may_turn(image):
        source *= 2
    tw, th = target_size(w, h, config)
    gh, gw = grid_size(w, h, config)
    p = config.patch_size
    narrowed = max(tw * h, w * th) * 4 if (tw, th) != (w, h) else 0
    bands = 2 * resize_bands.BAND_PIXELS * 4 * 2
    return source + narrowed + tw * th * 4 + bands + gh * gw * 3 * p * p * numpy_dtype(dtype).itemsize


def _may_turn(image: Image.Image) -> bool:
    """Whether EXIF may turn the image (exif_transpose makes a copy), without decoding it: a PNG's
    eXIf chunk may follow its pixels (Pillow's PNG getexif decodes the whole image to find it), so
    a PNG with no EXIF seen in its header counts as one that may turn."""
    if image.format == "PNG" and "exif" not in image.info:
        return True
    try:
        return image.getexif().get(ExifTags.Base.Orientation, 1) in _TURNING_ORIENTATIONS
    except Exception:  # noqa: BLE001 - unreadable EXIF: the decoder ignores it too
        return False


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of a wire dtype name; ValueError for a name not in WIRE_DTYPES."""
    name = dtypes.from_name(dtype).name
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


@lru_cache(maxsize=16)
def _pair_table(config: ProcessorConfig, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Lookup table from byte codes (one or two bytes of one channel) to wire-dtype values.

    Values are :func:`~kimivl_contract.processor.normalized_values` (the reference's float32
    arithmetic), cast once to the wire dtype. Returns the flat table and, per channel, the
    offset of its section; None when the three channels normalize alike (one section, and the
    common case skips an add).
    """
    wire = numpy_dtype(dtype)
    unit = 2 if config.patch_size**2 % 2 == 0 else 1
    codes = np.arange(256**unit, dtype=f"u{unit}").view(np.uint8).reshape(-1, unit)  # bytes in memory order
    channels = list(zip(config.image_mean, config.image_std, strict=True))
    distinct = list(dict.fromkeys(channels))
    reference = normalized_values(*zip(*distinct, strict=True))  # one row per distinct (mean, std)
    sections = [np.ascontiguousarray(row.astype(wire)[codes]).view(f"u{unit * wire.itemsize}").reshape(-1)
                for row in reference]
    table = np.concatenate(sections)
    table.flags.writeable = False
    if len(distinct) == 1:
        return table, None
    offsets = (np.array([distinct.index(ch) for ch in channels], dtype=np.intp) * 256**unit).reshape(3, 1)
    offsets.flags.writeable = False
    return table, offsets


def preprocess_image_bytes(
    data: bytes, config: ProcessorConfig, dtype: str = "bfloat16", *, max_pixels: int = DEFAULT_MAX_PIXELS,
    cancel: CancelToken | None = None,
) -> ProcessedImage:
    """Encoded image bytes to engine-ready patches (= :func:`load_image` + :func:`process_image`)."""
    numpy_dtype(dtype)  # a caller's mistake is reported before any decoding
    return process_decoded(decode(open_image(data, max_pixels=max_pixels, cancel=cancel), cancel), config, dtype,
                           cancel)
