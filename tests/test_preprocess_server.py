"""The preprocessing tier as a real server on loopback: prepared prompts, and every bad
input answered with a clear gRPC status while the server keeps serving."""
from __future__ import annotations

import base64
import io

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from skimage import data as skdata
from transformers import AutoTokenizer

from kimivl.v1 import chat_pb2, chat_pb2_grpc, preprocess_pb2, preprocess_pb2_grpc, types_pb2
from kimivl_contract.processor import ProcessorConfig
from kimivl_preprocess.image import preprocess_image_bytes

PAD = "<|media_pad|>"


def jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


ASTRONAUT = jpeg(skdata.astronaut())  # 512x512 photo
COFFEE = jpeg(skdata.coffee())  # 600x400 photo


def text(t):
    return types_pb2.ContentPart(text=t)


def image(**kw):
    return types_pb2.ContentPart(image=types_pb2.Image(**kw))


def conversation(*parts, role=types_pb2.ROLE_USER):
    return types_pb2.Conversation(messages=[types_pb2.Message(role=role, content=list(parts))])


@pytest.fixture(scope="module")
def stubs(front_door_alone):
    ch = grpc.insecure_channel(front_door_alone.target, options=[("grpc.max_receive_message_length", 256 << 20),
                                                                  ("grpc.max_send_message_length", 256 << 20)])
    yield preprocess_pb2_grpc.PreprocessServiceStub(ch), chat_pb2_grpc.ChatServiceStub(ch)
    ch.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(str(tiny_model), trust_remote_code=True)


def preprocess(stub, conv=None, raw=None, dtype=types_pb2.TENSOR_DTYPE_BFLOAT16):
    req = preprocess_pb2.PreprocessRequest(dtype=dtype)
    if conv is not None:
        req.conversation.CopyFrom(conv)
    if raw is not None:
        req.raw_prompt.CopyFrom(raw)
    return stub.Preprocess(req, timeout=60)


def test_interleaved_images_become_placeholder_runs_and_tensors(stubs, tokenizer, tiny_model):
    pre, _ = stubs
    conv = conversation(text("Compare"), image(data=ASTRONAUT), text("with"),
                        image(data_uri="data:image/jpeg;base64," + base64.b64encode(COFFEE).decode()), text("please."))
    r = preprocess(pre, conv, dtype=types_pb2.TENSOR_DTYPE_FLOAT32)
    # The rendered text is the model's chat template, each image one pad token in order.
    expected_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"},
                                      {"type": "text", "text": "with"}, {"type": "image"},
                                      {"type": "text", "text": "please."}]}],
        tokenize=False, add_generation_prompt=True)
    assert r.prompt_text == expected_text
    assert r.prompt_text.count(PAD) == 2
    cfg = ProcessorConfig.from_model_dir(str(tiny_model))
    ids = np.array(r.prompt.token_ids)
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    base_ids = tokenizer(expected_text, add_special_tokens=False)["input_ids"]
    assert len(r.prompt.images) == 2
    offset_shift = 0
    for img, raw in zip(r.prompt.images, [ASTRONAUT, COFFEE], strict=True):
        local = preprocess_image_bytes(raw, cfg, "float32")
        assert (img.grid_height, img.grid_width) == local.grid_hw
        assert img.placeholder_length == local.grid_hw[0] * local.grid_hw[1] // 4
        run = ids[img.placeholder_offset:img.placeholder_offset + img.placeholder_length]
        assert (run == pad_id).all()
        assert ids[img.placeholder_offset - 1] != pad_id
        assert ids[img.placeholder_offset + img.placeholder_length] != pad_id
        t = img.pixel_values
        assert t.dtype == types_pb2.TENSOR_DTYPE_FLOAT32
        assert list(t.shape) == [local.grid_hw[0] * local.grid_hw[1], 3, 14, 14]
        got = np.frombuffer(t.data, dtype="<f4").reshape(tuple(t.shape))
        np.testing.assert_array_equal(got, local.pixel_values)
        assert img.content_hash == local.content_hash
        offset_shift += img.placeholder_length - 1
    # Outside the runs, the ids are exactly the tokenized template.
    mask = np.ones(len(ids), bool)
    for img in r.prompt.images:
        mask[img.placeholder_offset:img.placeholder_offset + img.placeholder_length] = False
    outside = list(ids[mask])
    assert [t for t in base_ids if t != pad_id] == outside
    assert len(ids) == len(base_ids) + offset_shift
    assert r.prompt.images[0].content_hash != r.prompt.images[1].content_hash


@pytest.mark.parametrize(("asked", "sent", "local_dtype"), [
    (types_pb2.TENSOR_DTYPE_UNSPECIFIED, types_pb2.TENSOR_DTYPE_BFLOAT16, "bfloat16"),  # the default
    (types_pb2.TENSOR_DTYPE_UINT8, types_pb2.TENSOR_DTYPE_UINT8, "uint8"),  # raw pixel patches
])
def test_patches_in_the_asked_dtype(stubs, tiny_model, asked, sent, local_dtype):
    pre, _ = stubs
    r = preprocess(pre, conversation(image(data=ASTRONAUT), text("hi")), dtype=asked)
    t = r.prompt.images[0].pixel_values
    assert t.dtype == sent
    local = preprocess_image_bytes(ASTRONAUT, ProcessorConfig.from_model_dir(str(tiny_model)), local_dtype)
    assert t.data == local.pixel_values.tobytes() and list(t.shape) == list(local.pixel_values.shape)
    assert r.prompt.images[0].content_hash == local.content_hash


def test_unknown_dtype_is_invalid_argument(stubs):
    pre, _ = stubs
    with pytest.raises(grpc.RpcError) as e:
        preprocess(pre, conversation(image(data=ASTRONAUT), text("hi")), dtype=99)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dtype" in e.value.details() and "99" in e.value.details()
    assert preprocess(pre, conversation(text("still there?"))).prompt.token_ids


def test_raw_prompt_markers_take_images_in_order(stubs, tokenizer):
    pre, _ = stubs
    raw = types_pb2.RawPrompt(text="<|im_user|>user<|im_middle|>A <image> then <image>?<|im_end|>",
                              images=[types_pb2.Image(data=COFFEE), types_pb2.Image(data=ASTRONAUT)])
    r = preprocess(pre, raw=raw)
    assert [(i.grid_height, i.grid_width) for i in r.prompt.images] == [(30, 44), (38, 38)]
    assert r.prompt.images[0].placeholder_offset < r.prompt.images[1].placeholder_offset


def test_reflection_lists_the_services(front_door_alone):
    with grpc.insecure_channel(front_door_alone.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
    assert {"kimivl.v1.ChatService", "kimivl.v1.PreprocessService", "grpc.health.v1.Health"} <= names


def test_chat_without_inference_tier_is_unavailable_with_a_clear_message(stubs, front_door_alone):
    _, chat = stubs
    with pytest.raises(grpc.RpcError) as e:
        list(chat.Chat(chat_pb2.ChatRequest(conversation=conversation(text("hello"))), timeout=30))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "inference tier unavailable" in e.value.details()
    # The internal address is for the operator's log, not the client.
    target = front_door_alone.args[front_door_alone.args.index("--inference-target") + 1]
    assert target not in e.value.details() and "127.0.0.1" not in e.value.details()
    assert f"inference tier {target} unavailable" in front_door_alone.tail(200)


def _big_png() -> bytes:
    return png(Image.new("1", (20000, 9000)))  # 180 M pixels, a few KB encoded


BAD_PREPROCESS = {
    "empty conversation": (types_pb2.Conversation(), grpc.StatusCode.INVALID_ARGUMENT, "conversation.messages is empty"),
    "no role": (types_pb2.Conversation(messages=[types_pb2.Message(content=[text("x")])]),
                grpc.StatusCode.INVALID_ARGUMENT, "conversation.messages[0].role"),
    "empty content": (types_pb2.Conversation(messages=[types_pb2.Message(role=types_pb2.ROLE_USER)]),
                      grpc.StatusCode.INVALID_ARGUMENT, "conversation.messages[0].content is empty"),
    "empty part": (conversation(text("x"), types_pb2.ContentPart()), grpc.StatusCode.INVALID_ARGUMENT,
                   "conversation.messages[0].content[1] is empty"),
    "image without source": (conversation(types_pb2.ContentPart(image=types_pb2.Image())),
                             grpc.StatusCode.INVALID_ARGUMENT, "has no source"),
    "corrupt image": (conversation(text("x"), image(data=b"\x89PNG\r\n\x1a\n not really")),
                      grpc.StatusCode.INVALID_ARGUMENT, "conversation.messages[0].content[1].image"),
    "svg is not an allowed format": (conversation(image(data=b"<svg xmlns='http://www.w3.org/2000/svg'/>")),
                                     grpc.StatusCode.INVALID_ARGUMENT, "conversation.messages[0].content[0].image"),
    "bad data uri": (conversation(image(data_uri="data:image/png;base64,@@@")), grpc.StatusCode.INVALID_ARGUMENT,
                     "content[0].image.data_uri"),
    "not a data uri": (conversation(image(data_uri="http://x")), grpc.StatusCode.INVALID_ARGUMENT,
                       "is not a data URI"),
    "file url": (conversation(image(url="file:///etc/passwd")), grpc.StatusCode.INVALID_ARGUMENT,
                 "only http and https"),
    "image in assistant message": (conversation(image(data=ASTRONAUT), role=types_pb2.ROLE_ASSISTANT),
                                   grpc.StatusCode.INVALID_ARGUMENT, "only user messages take images"),
    "too many images": (conversation(*[image(data=COFFEE)] * 9), grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "9 images; the limit is 8"),
    "too many pixels": (conversation(image(data=_big_png())), grpc.StatusCode.RESOURCE_EXHAUSTED, "178956970"),
    "prompt longer than the context": (conversation(text("red green blue " * 3500)),
                                       grpc.StatusCode.INVALID_ARGUMENT, "the model's context is"),
    "text longer than any prompt could be": (conversation(text("red green blue " * 6000)),
                                             grpc.StatusCode.RESOURCE_EXHAUSTED,
                                             "is 90000 characters; the limit is 65536 (the 8192-token context"),
}


@pytest.mark.parametrize("case", list(BAD_PREPROCESS))
def test_bad_input_gets_a_clear_status_and_the_server_keeps_serving(stubs, front_door_alone, case):
    conv, code, fragment = BAD_PREPROCESS[case]
    pre, _ = stubs
    with pytest.raises(grpc.RpcError) as e:
        preprocess(pre, conv)
    assert e.value.code() == code, e.value.details()
    assert fragment in e.value.details()
    assert front_door_alone.proc.poll() is None
    assert preprocess(pre, conversation(text("still there?"), image(data=COFFEE))).prompt.images


BAD_RAW = {
    "marker count": (types_pb2.RawPrompt(text="<image> and <image>", images=[types_pb2.Image(data=COFFEE)]),
                     "raw_prompt.text has 2 <image> markers but raw_prompt.images has 1"),
    "empty raw text": (types_pb2.RawPrompt(text="  "), "raw_prompt.text is empty"),
    # Raw prompts are verbatim (their control tokens count), but image slots are the server's.
    "media token in raw text": (types_pb2.RawPrompt(text="sneaky <|media_pad|> token"),
                                "raw_prompt.text contains the reserved token <|media_pad|>"),
}


@pytest.mark.parametrize("case", list(BAD_RAW))
def test_bad_raw_prompt(stubs, case):
    raw, fragment = BAD_RAW[case]
    with pytest.raises(grpc.RpcError) as e:
        preprocess(stubs[0], raw=raw)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in e.value.details()


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x.png", "http://169.254.169.254/latest/meta-data",
                                 "http://[::1]/a.png", "http://10.1.2.3/a.png", "http://localhost:9/a.png"])
def test_private_urls_are_refused_by_default(stubs, url):
    # front_door_alone runs with --allow-private-urls; this checks the default policy in-process
    # through the same fetcher the server uses, without sending any traffic.
    import asyncio

    from kimivl_contract.errors import RequestError
    from kimivl_preprocess.sources import FetchPolicy, ImageFetcher

    async def go():
        f = ImageFetcher(FetchPolicy())
        try:
            await f.fetch(types_pb2.Image(url=url), "img")
        finally:
            await f.close()

    with pytest.raises(RequestError, match="non-public addresses"):
        asyncio.run(go())


BAD_CHAT_SAMPLING = {
    "temperature": (types_pb2.SamplingParameters(temperature=5), "sampling.temperature is 5"),
    "top_p": (types_pb2.SamplingParameters(top_p=0), "sampling.top_p"),
    "stop": (types_pb2.SamplingParameters(stop=["x"] * 17), "sampling.stop has 17 strings"),
}


@pytest.mark.parametrize("case", list(BAD_CHAT_SAMPLING))
def test_chat_rejects_sampling_out_of_range_before_any_work(stubs, case):
    sampling, fragment = BAD_CHAT_SAMPLING[case]
    with pytest.raises(grpc.RpcError) as e:
        list(stubs[1].Chat(chat_pb2.ChatRequest(conversation=conversation(text("x")), sampling=sampling), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in e.value.details()
