"""Prepared-prompt validation and placeholder expansion, without an engine (make test-fast runs them).

check_prepared_prompt is what keeps a malformed prompt from killing vLLM's engine core; the
same cases go through the real inference tier in tests/test_end_to_end.py.
"""
from __future__ import annotations

import asyncio

import pytest

import imagedata
from kimivl.v1 import chat_pb2, types_pb2
from kimivl_contract.errors import RequestError
from kimivl_contract.prepared import PromptLimits, check_prepared_prompt
from kimivl_contract.processor import ProcessorConfig
from kimivl_preprocess.pipeline import Preprocessor
from kimivl_preprocess.pool import ImagePool
from kimivl_preprocess.prompt import PromptBuilder
from kimivl_preprocess.sources import FetchPolicy, ImageFetcher
from prepared_cases import mutations


@pytest.fixture(scope="module")
def preprocessor(tiny_model):
    pool = ImagePool(ProcessorConfig.from_model_dir(str(tiny_model)), workers=1)
    yield Preprocessor(str(tiny_model), pool, ImageFetcher(FetchPolicy()), max_images=8)
    pool.close()


def _chat(*parts) -> chat_pb2.ChatRequest:
    content = [types_pb2.ContentPart(text=p) if isinstance(p, str) else types_pb2.ContentPart(
        image=types_pb2.Image(data=p)) for p in parts]
    return chat_pb2.ChatRequest(conversation=types_pb2.Conversation(
        messages=[types_pb2.Message(role=types_pb2.ROLE_USER, content=content)]))


@pytest.fixture(scope="module")
def prompt(preprocessor) -> types_pb2.PreparedPrompt:
    prepared = asyncio.run(preprocessor.prepare(_chat("Look", imagedata.photo_jpeg("coffee")), "bfloat16"))
    return prepared.prompt.message()


def test_a_prepared_prompt_passes_and_counts_its_image_tokens(preprocessor, prompt):
    (img,) = prompt.images
    assert check_prepared_prompt(prompt, preprocessor.limits) == img.grid_height * img.grid_width // 4


def test_every_broken_rule_is_refused_naming_the_field(preprocessor, prompt):
    cases = mutations(prompt)
    assert len(cases) >= 13
    for name, mutate, fragment in cases:
        with pytest.raises(RequestError) as e:
            check_prepared_prompt(mutate(), preprocessor.limits)
        assert fragment in str(e.value), f"{name}: {e.value}"


def test_an_image_over_the_encoder_cache_is_resource_exhausted(preprocessor, prompt):
    limits = PromptLimits(**{**preprocessor.limits.__dict__, "max_image_tokens": 16})
    with pytest.raises(RequestError, match="encoder cache holds 16") as e:
        check_prepared_prompt(prompt, limits)
    assert e.value.resource_exhausted


def test_the_tensor_bytes_read_are_handed_back(preprocessor, prompt):
    data: list[bytes] = []
    check_prepared_prompt(prompt, preprocessor.limits, tensor_data=data)
    assert data == [prompt.images[0].pixel_values.data]


@pytest.fixture(scope="module")
def builder(tiny_model) -> PromptBuilder:
    return PromptBuilder(str(tiny_model))


def test_expansion_replaces_each_pad_by_its_image_tokens(builder):
    pad = builder.pad_id
    out = builder.expand([1, pad, 2, 3, pad, 4], [3, 2])
    assert out.token_ids == [1, pad, pad, pad, 2, 3, pad, pad, 4]
    assert out.placeholders == [(1, 3), (6, 2)]


def test_expansion_refuses_slot_and_image_counts_that_differ(builder):
    pad = builder.pad_id
    with pytest.raises(RequestError, match="more image slots than the 1 images"):
        builder.expand([pad, pad], [4])
    with pytest.raises(RequestError, match="has 1 image slots but 2 images"):
        builder.expand([pad], [4, 4])
