"""Test images as encoded bytes: real photos (``skimage.data``) and made edge cases.

Shared by the test suite and ``bench/preprocess.py``; the names below are a stable API.

Photos: :func:`photo` (pixels), :func:`photo_jpeg`, :func:`photo_png`, :func:`mosaic` /
:func:`mosaic_jpeg` (real photos tiled at native scale up to any size, so large test images
keep a real photo's detail and JPEG cost), :func:`document_png` (a scanned-text page).

Edge cases (bytes): :func:`sized_png`, :func:`grayscale_png`, :func:`gray16_png`,
:func:`cmyk_jpeg`, :func:`palette_trns_png`, :func:`la_png`, :func:`rgba_png` (alpha:
:func:`rgba_alpha`), :func:`exif_jpeg`, :func:`animated_gif`. Refused inputs:
:func:`truncated_jpeg`, :func:`truncated_exif_jpeg`, :func:`garbage_bytes`, :func:`eps_bytes`,
:func:`svg_bytes`, and :func:`png_header_only` (any declared size, for pixel-limit tests).

:data:`DECODABLE` and :data:`REFUSED` map a case name to a zero-argument function giving the
bytes, for parametrized tests.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from functools import cache
from io import BytesIO

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@cache
def photo(name: str = "astronaut") -> np.ndarray:
    """A real RGB photo from ``skimage.data`` as (H, W, 3) uint8 (read-only)."""
    from skimage import data

    pixels = np.ascontiguousarray(getattr(data, name)()[..., :3])
    pixels.flags.writeable = False
    return pixels


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG", **params) -> bytes:
    """Encode a Pillow image or an array with Pillow (``params`` go to ``Image.save``)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def photo_jpeg(name: str = "astronaut", quality: int = 90) -> bytes:
    return encode(photo(name), "JPEG", quality=quality)


def photo_png(name: str = "astronaut") -> bytes:
    return encode(photo(name), "PNG")


def mosaic(width: int, height: int) -> Image.Image:
    """An RGB image of the given size tiled from the real photos at native scale.

    Every other tile is mirrored so that tiles differ; resizing a small photo up instead would
    give smooth pixels that decode unrealistically fast.
    """
    canvas = Image.new("RGB", (width, height))
    k, y = 0, 0
    while y < height:
        x, row = 0, 0
        while x < width:
            tile = Image.fromarray(photo(PHOTOS[k % len(PHOTOS)]))
            if k % 2:
                tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            canvas.paste(tile, (x, y))
            x, row, k = x + tile.width, max(row, tile.height), k + 1
        y += row
    return canvas


def mosaic_jpeg(megapixels: float, quality: int = 90, aspect: float = 4 / 3) -> bytes:
    """A JPEG photo mosaic of about ``megapixels`` million pixels (width:height = aspect)."""
    height = round((megapixels * 1e6 / aspect) ** 0.5)
    return encode(mosaic(round(height * aspect), height), "JPEG", quality=quality)


def document_png(width: int = 1600, height: int = 1200) -> bytes:
    """A document-like RGB page: ``skimage.data.page``/``text`` scans on white, as PNG."""
    from skimage import data

    page = Image.new("L", (width, height), 255)
    scans = [Image.fromarray(data.page()), Image.fromarray(data.text())]
    y, k = 40, 0
    while y < height - 40:
        scan = scans[k % 2]
        page.paste(scan, (60 + (k % 3) * 40, y))
        y, k = y + scan.height + 30, k + 1
    return encode(page.convert("RGB"), "PNG")


def sized_png(width: int, height: int) -> bytes:
    """An RGB PNG of exactly ``width`` x ``height`` cut from a photo mosaic."""
    return encode(mosaic(width, height), "PNG")


def grayscale_png() -> bytes:
    """Mode L (``skimage.data.camera``)."""
    from skimage import data

    return encode(data.camera(), "PNG")


def gray16_png() -> bytes:
    """16-bit grayscale PNG (opens as I;16), values spanning the full 16-bit range."""
    gray = np.asarray(Image.fromarray(photo("coffee")).convert("L"), dtype=np.uint16)
    return encode(Image.fromarray(gray * 257), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(Image.fromarray(photo("chelsea")).convert("CMYK"), "JPEG", quality=90)


def palette_trns_png() -> bytes:
    """Mode P with a tRNS chunk: one palette entry (a colour present in the image) transparent."""
    image = Image.fromarray(photo("rocket")).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return encode(image, "PNG", transparency=int(np.asarray(image)[0, 0]))


def la_png() -> bytes:
    """Mode LA: a grayscale photo with a left-to-right alpha ramp."""
    gray = np.asarray(Image.fromarray(photo("astronaut")).convert("L"))
    alpha = np.broadcast_to(np.linspace(0, 255, gray.shape[1]).astype(np.uint8), gray.shape)
    return encode(Image.fromarray(np.dstack([gray, alpha]), "LA"), "PNG")


def rgba_alpha() -> np.ndarray:
    """The alpha of :func:`rgba_png`: opaque disc, transparent corners, a ramp between."""
    y, x = np.mgrid[:512, :512]
    radius = np.hypot(y - 255.5, x - 255.5)
    return np.clip((240 - radius) * 8, 0, 255).astype(np.uint8)


def rgba_png() -> bytes:
    """Mode RGBA: ``astronaut`` with :func:`rgba_alpha` (fully, partly and not transparent)."""
    return encode(Image.fromarray(np.dstack([photo("astronaut"), rgba_alpha()]), "RGBA"), "PNG")


def exif_jpeg(orientation: int) -> bytes:
    """A non-square JPEG whose EXIF Orientation tag (0x0112) is ``orientation`` (1-8)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo("coffee"), "JPEG", quality=90, exif=exif)


def animated_gif() -> bytes:
    """Three frames from three photos (the first frame is ``chelsea``)."""
    frames = [Image.fromarray(photo(n)[:300, :400]).convert("P") for n in ("chelsea", "coffee", "rocket")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def truncated_jpeg() -> bytes:
    """The first half of a JPEG: the header parses, decoding fails."""
    data = photo_jpeg("astronaut")
    return data[: len(data) // 2]


def truncated_exif_jpeg() -> bytes:
    """The first half of an EXIF-rotated JPEG: rotating fails too (vLLM ignores that, then fails)."""
    data = exif_jpeg(6)
    return data[: len(data) // 2]


def garbage_bytes() -> bytes:
    return b"this is not an image\x00\x01\x02" * 10


def eps_bytes() -> bytes:
    """Encapsulated PostScript: Pillow can read it, but only via Ghostscript; vLLM refuses it."""
    return encode(Image.fromarray(photo("chelsea")[:32, :32]), "EPS")


def svg_bytes() -> bytes:
    return b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but carries no pixel data (cheap size tests)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


DECODABLE: dict[str, Callable[[], bytes]] = {
    **{f"{name}_jpeg": (lambda n=name: photo_jpeg(n)) for name in PHOTOS},
    "astronaut_png": photo_png,
    "document_png": document_png,
    "grayscale_L": grayscale_png,
    "gray16_I;16": gray16_png,
    "cmyk_jpeg": cmyk_jpeg,
    "palette_trns": palette_trns_png,
    "LA": la_png,
    "RGBA": rgba_png,
    **{f"exif_orientation_{o}": (lambda o=o: exif_jpeg(o)) for o in (1, 2, 3, 5, 6, 7, 8, 9)},
    "animated_gif": animated_gif,
    **{f"rgb_{w}x{h}": (lambda w=w, h=h: sized_png(w, h)) for w, h in ((1, 1), (13, 13), (29, 57), (57, 29))},
}

REFUSED: dict[str, Callable[[], bytes]] = {
    "truncated_jpeg": truncated_jpeg,
    "truncated_exif_jpeg": truncated_exif_jpeg,
    "garbage": garbage_bytes,
    "empty": lambda: b"",
    "eps": eps_bytes,
    "svg": svg_bytes,
}
