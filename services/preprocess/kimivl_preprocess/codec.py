"""Tensor codec: processed images to and from the wire (kimivl.v1.Tensor)."""
from __future__ import annotations

import blake3

from kimivl.v1 import types_pb2

DTYPE_TO_PROTO = {
    "bfloat16": types_pb2.TENSOR_DTYPE_BFLOAT16,
    "float16": types_pb2.TENSOR_DTYPE_FLOAT16,
    "float32": types_pb2.TENSOR_DTYPE_FLOAT32,
}
PROTO_TO_DTYPE = {v: k for k, v in DTYPE_TO_PROTO.items()}
PROTO_TO_DTYPE[types_pb2.TENSOR_DTYPE_UNSPECIFIED] = "bfloat16"


def prepared_image(processed, dtype: str, offset: int, length: int) -> types_pb2.PreparedImage:
    """A ProcessedImage (kimivl_preprocess.image) as a PreparedImage message."""
    pv = processed.pixel_values
    h, w = processed.grid_hw
    return types_pb2.PreparedImage(
        pixel_values=types_pb2.Tensor(dtype=DTYPE_TO_PROTO[dtype], shape=list(pv.shape), data=pv.tobytes()),
        grid_height=h, grid_width=w, placeholder_offset=offset, placeholder_length=length,
        content_hash=processed.content_hash,
    )


def tensor_content_hash(image: types_pb2.PreparedImage) -> str:
    """Identity of an image received as a tensor: its bytes, dtype and grid.

    Used for client-supplied prepared prompts, whose own hashes are not trusted (a wrong
    one would let a request read another image's cached encoder output).
    """
    t = image.pixel_values
    h = blake3.blake3(f"{PROTO_TO_DTYPE[t.dtype]}:{image.grid_height}x{image.grid_width}:".encode())
    h.update(t.data)
    return "kimivl-tensor:" + h.hexdigest()
