"""Tensor codec: processed images to the wire (kimivl.v1.PreparedPrompt and the messages
that carry it).

Patch tensors are megabytes. Setting them into protobuf messages copies them at every level
(Tensor, PreparedImage, PreparedPrompt, then the enclosing request), and the Python upb
runtime's copies of fields this large cost milliseconds each under the GIL: 13-30 ms for one
2 MP photo in bfloat16, on the event loop (bench/wire_cost.py: 12.9x the codec's time). So the
small fields are built and serialized by protobuf as usual, while each tensor's bytes are
framed as their length-delimited field by hand and joined once, straight from the numpy
buffer, into the final message. The bytes parse as the same message (tests/test_codec.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kimivl.v1 import inference_pb2, preprocess_pb2, types_pb2
from kimivl_contract import dtypes

_LEN = 2  # protobuf wire type of length-delimited fields


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, chunks: list) -> list:
    """``chunks`` (bytes-like, together one encoded value) as length-delimited field ``number``."""
    size = sum(len(c) for c in chunks)
    return [_varint(number << 3 | _LEN) + _varint(size), *chunks]


@dataclass
class PromptWire:
    """A PreparedPrompt in serialized form, as chunks that reference the tensors' buffers."""

    chunks: list
    images: int

    @classmethod
    def from_images(cls, token_ids, processed: list, dtype: str, placeholders: list) -> PromptWire:
        """Token ids + ProcessedImages (kimivl_preprocess.image) with their (offset, length)."""
        chunks = [types_pb2.PreparedPrompt(token_ids=token_ids).SerializeToString()]
        for p, (offset, length) in zip(processed, placeholders, strict=True):
            pv = p.pixel_values
            tensor = [types_pb2.Tensor(dtype=dtypes.from_name(dtype).proto, shape=pv.shape).SerializeToString(),
                      *_field(3, [memoryview(pv.reshape(-1).view(np.uint8))])]
            h, w = p.grid_hw
            rest = types_pb2.PreparedImage(grid_height=h, grid_width=w, placeholder_offset=offset,
                                           placeholder_length=length, content_hash=p.content_hash)
            chunks += _field(2, [*_field(1, tensor), rest.SerializeToString()])
        return cls(chunks, len(processed))

    @classmethod
    def from_message(cls, prompt: types_pb2.PreparedPrompt) -> PromptWire:
        return cls([prompt.SerializeToString()], len(prompt.images))

    def release(self) -> None:
        """Drop the references to the tensors (once serialized into a request); ``images`` stays."""
        self.chunks = []

    def message(self) -> types_pb2.PreparedPrompt:
        """Parsed back (tests, in-process callers); copies every tensor."""
        return types_pb2.PreparedPrompt.FromString(b"".join(self.chunks))


def generate_request(prompt: PromptWire, **fields) -> bytes:
    """A serialized GenerateRequest: ``prompt`` plus the other fields (sampling, thinking, …)."""
    return b"".join([*_field(1, prompt.chunks), inference_pb2.GenerateRequest(**fields).SerializeToString()])


def preprocess_response(prompt: PromptWire, **fields) -> bytes:
    """A serialized PreprocessResponse: ``prompt`` plus the other fields."""
    return b"".join([*_field(1, prompt.chunks), preprocess_pb2.PreprocessResponse(**fields).SerializeToString()])
