"""The front door's codec writes tensor-carrying messages itself (from the numpy buffers):
what it writes must parse as exactly the message protobuf would have built."""
from __future__ import annotations

import numpy as np
import pytest

import imagedata
from kimivl.v1 import inference_pb2, preprocess_pb2, types_pb2
from kimivl_contract import dtypes
from kimivl_contract.processor import ProcessorConfig
from kimivl_preprocess.codec import PromptWire, generate_request, preprocess_response
from kimivl_preprocess.image import preprocess_image_bytes


def _expected(ids, processed, dtype, placeholders) -> types_pb2.PreparedPrompt:
    return types_pb2.PreparedPrompt(token_ids=ids, images=[
        types_pb2.PreparedImage(
            pixel_values=types_pb2.Tensor(dtype=dtypes.from_name(dtype).proto, shape=list(p.pixel_values.shape),
                                          data=p.pixel_values.tobytes()),
            grid_height=p.grid_hw[0], grid_width=p.grid_hw[1], placeholder_offset=off, placeholder_length=n,
            content_hash=p.content_hash)
        for p, (off, n) in zip(processed, placeholders, strict=True)])


@pytest.mark.parametrize("dtype", ["uint8", "bfloat16", "float16", "float32"])
def test_prompt_wire_parses_as_the_protobuf_message(dtype):
    cfg = ProcessorConfig()
    processed = [preprocess_image_bytes(imagedata.photo_jpeg(n), cfg, dtype) for n in ("coffee", "rocket")]
    # ids past 127 and 16383 take 2- and 3-byte varints; a 200 KB+ tensor a 3-byte length.
    ids = [1, 200, 70000, 163605]
    placeholders = [(3, processed[0].num_tokens), (3 + processed[0].num_tokens + 1, processed[1].num_tokens)]
    wire = PromptWire.from_images(ids, processed, dtype, placeholders)
    expected = _expected(ids, processed, dtype, placeholders)
    assert wire.images == 2
    assert wire.message() == expected
    assert len(b"".join(wire.chunks)) == expected.ByteSize()


def test_requests_carry_the_prompt_and_their_other_fields():
    processed = [preprocess_image_bytes(imagedata.photo_jpeg("chelsea"), ProcessorConfig(), "uint8")]
    ids = [5] + [163605] * processed[0].num_tokens + [6]
    wire = PromptWire.from_images(ids, processed, "uint8", [(1, processed[0].num_tokens)])
    sampling = types_pb2.SamplingParameters(temperature=0.0, max_tokens=7, stop=["x"])
    thinking = types_pb2.ThinkingOptions(max_thinking_tokens=3)
    req = inference_pb2.GenerateRequest.FromString(
        generate_request(wire, sampling=sampling, thinking=thinking, request_id="r1"))
    assert req == inference_pb2.GenerateRequest(prompt=wire.message(), sampling=sampling, thinking=thinking,
                                                request_id="r1")
    resp = preprocess_pb2.PreprocessResponse.FromString(preprocess_response(wire, prompt_text="t", preprocess_ms=1.5))
    assert resp == preprocess_pb2.PreprocessResponse(prompt=wire.message(), prompt_text="t", preprocess_ms=1.5)


def test_a_received_prompt_passes_through_unchanged():
    prompt = types_pb2.PreparedPrompt(token_ids=[1, 2], images=[types_pb2.PreparedImage(
        pixel_values=types_pb2.Tensor(dtype=types_pb2.TENSOR_DTYPE_UINT8, shape=[4, 3, 14, 14],
                                      data=np.arange(4 * 588, dtype=np.uint8).tobytes()),
        grid_height=2, grid_width=2, placeholder_offset=1, placeholder_length=1, content_hash="h")])
    wire = PromptWire.from_message(prompt)
    assert wire.images == 1 and wire.message() == prompt
    assert inference_pb2.GenerateRequest.FromString(generate_request(wire)).prompt == prompt
