"""The identity of an image tensor, as the engine's caches know it.

vLLM keys its encoder cache, prefix cache and multimodal caches by each image's hash and trusts
it: two different tensors under one hash share cached results. So a tier never takes a hash it
was handed: it derives one from exactly what reaches the engine — the tensor's bytes, dtype and
grid, and the normalization that turns uint8 pixels into model input — so that no two
different inputs can share a cache entry, whoever sends them.
"""
from __future__ import annotations

from .dtypes import BY_PROTO

PREFIX = "kimivl-tensor:"


def tensor_identity(image, data: bytes | memoryview | None = None, normalization: bytes = b"") -> str:
    """``PREFIX`` + blake3 of dtype, grid, ``normalization`` and the tensor's bytes.

    ``image`` is a PreparedImage; ``data`` its ``pixel_values.data`` if already read (each read
    of a bytes field copies it). blake3 hashes large inputs on several threads and releases the
    GIL.
    """
    import blake3

    t = image.pixel_values
    data = t.data if data is None else data
    # Threads pay from several MB on (a 12 MP photo's patches are ~10 MB in uint8).
    h = blake3.blake3(max_threads=blake3.blake3.AUTO if len(data) >= 8 << 20 else 1)
    h.update(f"{BY_PROTO[t.dtype].name}:{image.grid_height}x{image.grid_width}:".encode() + normalization)
    h.update(data)
    return PREFIX + h.hexdigest()
