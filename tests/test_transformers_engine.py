"""The Transformers engine in-process on the tiny model (CPU, float32): scheduling, batching,
cancellation and sampling semantics. The gRPC tier and the equality with vLLM are in
test_transformers_tier.py."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import torch

from kimivl_inference.transformers_engine import SamplingParams, start_transformers_engine

IMAGE_PART = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"


def params(**kw) -> SamplingParams:
    base = dict(temperature=0.0, top_p=1.0, top_k=0, seed=None, repetition_penalty=1.0, stop=None, ignore_eos=True,
                max_tokens=12)
    return SamplingParams(**{**base, **kw})


@pytest.fixture(scope="module")
def engine(tiny_model):
    args = SimpleNamespace(model=str(tiny_model), device="cpu", dtype="float32", preset="none", max_model_len=None,
                           max_num_seqs=3, max_num_batched_tokens=None, attn_implementation="auto",
                           load_format="auto", seed=0, gpu_memory_utilization=None, swap_space=None)
    eng, tok, _ = start_transformers_engine(args)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def inputs(engine):
    """Engine inputs: a text prompt and an image prompt, as the server builds them."""
    from PIL import Image
    from skimage import data as skdata

    from kimivl_inference.hf_processor import KimiVLImageProcessor

    tok = engine.tokenizer

    def chat(text):
        return tok(tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]

    img = KimiVLImageProcessor()(Image.fromarray(skdata.chelsea()).resize((84, 84)))
    ids = chat(f"What is {IMAGE_PART}?")
    at = ids.index(163605)
    ids = ids[:at] + [163605] * (int(img["image_grid_hws"].prod()) // 4) + ids[at + 1:]
    return {"text": {"prompt_token_ids": chat("Tell me a story"), "pixel_values": None, "image_grid_hws": None},
            "image": {"prompt_token_ids": ids, "pixel_values": img["pixel_values"],
                      "image_grid_hws": img["image_grid_hws"]}}


async def collect(engine, inp, p, rid):
    ids, text, finish, stamps = [], "", None, []
    async for out in engine.generate(inp, p, rid):
        o = out.outputs[0]
        ids += o.token_ids
        text += o.text
        finish = o.finish_reason
        stamps.append(time.monotonic())
    return ids, text, finish, stamps


@pytest.mark.parametrize("case", ["text", "image"])
async def test_greedy_equals_transformers_generate(engine, inputs, case):
    inp = inputs[case]
    ids, text, finish, _ = await collect(engine, inp, params(), f"g-{case}")
    x = torch.tensor([inp["prompt_token_ids"]])
    kw = {} if inp["pixel_values"] is None else {"pixel_values": inp["pixel_values"],
                                                 "image_grid_hws": inp["image_grid_hws"]}
    with torch.no_grad():
        ref = engine.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=12,
                                    min_new_tokens=12, do_sample=False, **kw)[0, x.shape[1]:].tolist()
    assert ids == ref and finish == "length"
    assert text == engine.tokenizer.decode(ids, skip_special_tokens=True)


async def test_concurrent_requests_are_batched_and_each_equals_its_run_alone(engine, inputs):
    long_alone, *_ = await collect(engine, inputs["image"], params(max_tokens=30), "alone-a")
    short_alone, *_ = await collect(engine, inputs["text"], params(max_tokens=5), "alone-b")
    (long_ids, _, _, long_t), (short_ids, _, _, short_t) = await asyncio.gather(
        collect(engine, inputs["image"], params(max_tokens=30), "a"),
        collect(engine, inputs["text"], params(max_tokens=5), "b"))
    assert long_ids == long_alone and short_ids == short_alone
    assert short_t[-1] < long_t[-1]  # the short request did not wait for the long one
    assert short_t[0] < long_t[10]  # ... nor for most of it: the two decoded together


async def test_more_requests_than_rows_wait_their_turn(engine, inputs):
    outs = await asyncio.gather(*[collect(engine, inputs["text"], params(max_tokens=4 + i), f"q{i}")
                                  for i in range(5)])  # 3 rows
    assert [len(o[0]) for o in outs] == [4, 5, 6, 7, 8]
    assert all(o[0] == outs[-1][0][: len(o[0])] for o in outs)


async def test_closing_the_stream_frees_the_request(engine, inputs):
    stream = engine.generate(inputs["text"], params(max_tokens=500), "cancel-me")
    n = 0
    async for _ in stream:
        n += 1
        if n == 3:
            break
    await stream.aclose()
    for _ in range(100):
        if not engine._running and not engine._waiting and not engine._inbox:
            break
        await asyncio.sleep(0.05)
    assert not engine._running and not engine._waiting
    ids, *_ = await collect(engine, inputs["text"], params(max_tokens=3), "after")  # still serving
    assert len(ids) == 3


async def test_stop_string_ends_the_text_before_it(engine, inputs):
    ids, text, finish, _ = await collect(engine, inputs["text"], params(max_tokens=12), "s0")
    # A stop string from the middle of the greedy text: the same run ends just before it.
    cut = len(text) // 2
    stop = text[cut:cut + 3]
    sids, stext, sfinish, _ = await collect(engine, inputs["text"], params(max_tokens=12, stop=[stop]), "s1")
    assert sfinish == "stop" and stext == text[: text.index(stop)]
    assert sids == ids[: len(sids)] and len(sids) < len(ids)


async def test_seeded_sampling_is_reproducible(engine, inputs):
    p = params(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_tokens=10)
    a, *_ = await collect(engine, inputs["image"], p, "r1")
    b, *_ = await collect(engine, inputs["image"], p, "r2")
    c, *_ = await collect(engine, inputs["image"], params(temperature=1.0, top_p=0.9, top_k=50, seed=8,
                                                           max_tokens=10), "r3")
    assert a == b and a != c


def test_sampler_filters_as_vllm():
    from kimivl_inference.sampler import RequestSampling, _filtered

    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    keep = _filtered(logits.clone(), RequestSampling(params(temperature=1.0, top_k=2, seed=0), [], "cpu"))
    assert torch.isinf(keep[2:]).all() and not torch.isinf(keep[:2]).any()
    probs = logits.softmax(-1)  # 0.64, 0.24, 0.09, ...: top_p 0.8 keeps the first two
    keep = _filtered(logits.clone(), RequestSampling(params(temperature=1.0, top_p=0.8, seed=0), [], "cpu"))
    assert (~torch.isinf(keep)).sum() == 2 and probs[:1].sum() < 0.8 <= probs[:2].sum()
    pen = _filtered(logits.clone(), RequestSampling(params(temperature=1.0, repetition_penalty=2.0, seed=0),
                                                    [0, 4], "cpu"))
    assert pen[0] == 1.5 and pen[4] == -2.0 and pen[1] == 2.0  # positive / p, negative * p, others unchanged


def test_text_stream_holds_back_a_possible_stop_string(engine):
    from kimivl_inference.text_stream import TextStream

    tok = engine.tokenizer
    ids = tok.encode("The quick brown fox jumps", add_special_tokens=False)
    s = TextStream(tok, stop=["fox"])
    out = "".join(s.push(i) for i in ids)
    assert s.stopped and out == "The quick brown "
    s = TextStream(tok)
    assert "".join(s.push(i) for i in ids) + s.finish() == "The quick brown fox jumps"


def test_the_checkpoints_own_classes_load_even_with_vllms_config_registered(tiny_model):
    """Our vLLM plugin registers vLLM's kimi_vl config with transformers (for the processor);
    the Auto classes would then prefer it over the checkpoint's remote code, whose text config
    carries fields vLLM's lacks (rope_theta): the engine must load what auto_map names."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from kimivl_inference import hf_processor
    from kimivl_inference.transformers_engine import checkpoint_classes

    hf_processor.register()
    assert "kimi_vl" in CONFIG_MAPPING  # vLLM's, registered
    config_cls, model_cls = checkpoint_classes(str(tiny_model))
    assert config_cls.__module__.startswith("transformers_modules.") and config_cls.__name__ == "KimiVLConfig"
    assert model_cls.__name__ == "KimiVLForConditionalGeneration"
    assert config_cls.from_pretrained(str(tiny_model)).text_config.rope_theta == 800000.0


@pytest.mark.parametrize("penalties", [dict(frequency_penalty=0.5), dict(presence_penalty=0.7),
                                       dict(frequency_penalty=-0.3, presence_penalty=0.4, repetition_penalty=1.3)])
def test_penalties_equal_vllms(penalties):
    """The sampler's penalties against vLLM's own apply_penalties, on the same prompt and output."""
    from vllm.model_executor.layers.utils import apply_penalties

    from kimivl_inference.sampler import RequestSampling, _filtered

    torch.manual_seed(0)
    vocab, prompt, output = 50, [3, 7, 7, 11], [7, 20, 20, 20, 5]
    logits = torch.randn(vocab)
    state = RequestSampling(params(**penalties), prompt, "cpu")
    for t in output:
        state.observe(t)
    ours = _filtered(logits.clone(), state)  # greedy: penalties only, as vLLM applies them before temperature
    p = params(**penalties)
    theirs = apply_penalties(logits.clone()[None], torch.tensor([prompt]), torch.tensor([output]),
                             torch.tensor([p.presence_penalty]), torch.tensor([p.frequency_penalty]),
                             torch.tensor([p.repetition_penalty]))[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
