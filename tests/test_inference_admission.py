"""The inference tier's admission budgets with the real engine: requests past what the tier takes
are refused before headers and tensor work (UNAVAILABLE with a retry hint, so the front door
can try another replica), and the front door passes the hint on without internal addresses."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

import imagedata
from conftest import start_inference, start_preprocess
from kimivl.v1 import chat_pb2, chat_pb2_grpc, types_pb2
from kimivl_contract.processor import ProcessorConfig
from kimivl_preprocess.codec import generate_request
from kimivl_preprocess.pipeline import Preprocessor
from kimivl_preprocess.pool import ImagePool
from kimivl_preprocess.sources import FetchPolicy, ImageFetcher

pytestmark = pytest.mark.engine
GENERATE = "/kimivl.v1.InferenceService/Generate"


@pytest.fixture(scope="module")
def tight_tiers(tiny_model):
    # One request waiting for its first token, one more queued for up to 1 s; 8 MB of tensors.
    inf = start_inference(extra=["--max-waiting", "1", "--max-queued", "1", "--max-queue-wait-s", "1",
                                 "--max-tensor-mb", "8"])
    pre = None
    try:
        inf.wait_serving()
        pre = start_preprocess(inf.target)
        pre.wait_serving(120)
        yield inf, pre
    finally:
        if pre:
            pre.stop()
        inf.stop()


@pytest.fixture(scope="module")
def prepare(tiny_model):
    pool = ImagePool(ProcessorConfig.from_model_dir(str(tiny_model)), workers=1)
    pre = Preprocessor(str(tiny_model), pool, ImageFetcher(FetchPolicy()), max_images=8)

    def make(parts, max_tokens=32) -> bytes:
        content = [types_pb2.ContentPart(text=p) if isinstance(p, str) else
                   types_pb2.ContentPart(image=types_pb2.Image(data=p)) for p in parts]
        req = chat_pb2.ChatRequest(conversation=types_pb2.Conversation(messages=[
            types_pb2.Message(role=types_pb2.ROLE_USER, content=content)]))
        prepared = asyncio.run(pre.prepare(req, "uint8"))
        return generate_request(prepared.prompt, sampling=types_pb2.SamplingParameters(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True))

    yield make
    pre.close()
    pool.close()


async def _generate(target: str, requests: list[bytes], gap_s: float = 0.0):
    """Send each request (raw bytes) and read its stream; an AioRpcError or the message count each."""
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20),
                                                          ("grpc.enable_retries", 0)]) as ch:
        call = ch.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)

        async def one(raw):
            try:
                return len([m async for m in call(raw, timeout=120)])
            except grpc.aio.AioRpcError as e:
                return e

        tasks = []
        for raw in requests:
            tasks.append(asyncio.create_task(one(raw)))
            await asyncio.sleep(gap_s)
        return await asyncio.gather(*tasks)


def _shed(outcome) -> bool:
    return (isinstance(outcome, grpc.aio.AioRpcError) and outcome.code() == grpc.StatusCode.UNAVAILABLE
            and "at capacity" in outcome.details())


def test_requests_past_the_waiting_budget_are_queued_or_shed(tight_tiers, prepare):
    inf, _ = tight_tiers
    raw = prepare(["Count slowly"], max_tokens=48)
    t0 = time.perf_counter()
    outcomes = asyncio.run(_generate(inf.target, [raw] * 5, gap_s=0.01))
    served = [o for o in outcomes if isinstance(o, int)]
    shed = [o for o in outcomes if _shed(o)]
    assert len(served) + len(shed) == 5, outcomes
    assert served and len(shed) >= 3  # one admitted, one queued, the rest refused at once
    for e in shed:
        trailers = dict(e.trailing_metadata())
        # at once to the next replica, unless it already waited its turn (no retry: it would wait again)
        assert int(trailers["retry-after-ms"]) > 0
        assert trailers["grpc-retry-pushback-ms"] == ("-1" if "waited" in e.details() else "1")
        assert "retry after" in e.details()
    assert time.perf_counter() - t0 < 120
    assert asyncio.run(_generate(inf.target, [raw]))[0] > 1  # the budget is free again


def test_tensor_memory_past_the_budget_is_refused_at_once_and_relayed_by_the_front_door(tight_tiers, prepare):
    inf, pre = tight_tiers
    big = prepare(["Describe", imagedata.sized_png(1000, 1000)], max_tokens=96)  # ~9 MB held: admitted alone

    async def scenario():
        async with grpc.aio.insecure_channel(inf.target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            first = ch.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)(big, timeout=120)
            await first.read()  # streaming: it holds its tensors until the end
            second = await _generate(inf.target, [big])
            loop = asyncio.get_running_loop()
            relayed = await loop.run_in_executor(None, _chat_through_front_door, pre.target)
            rest = []
            while (m := await first.read()) is not grpc.aio.EOF:
                rest.append(m)
            return second[0], relayed, rest

    second, relayed, rest = asyncio.run(scenario())
    assert _shed(second) and "tensor memory" in second.details(), second
    assert rest  # the admitted one finished
    code, details, trailers = relayed
    assert code == grpc.StatusCode.UNAVAILABLE and details.startswith("inference tier unavailable"), details
    assert "at capacity" in details and int(trailers["retry-after-ms"]) > 0
    assert inf.target not in details and "127.0.0.1" not in details


def _chat_through_front_door(target: str):
    with grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]) as ch:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        req = chat_pb2.ChatRequest(
            conversation=types_pb2.Conversation(messages=[types_pb2.Message(role=types_pb2.ROLE_USER, content=[
                types_pb2.ContentPart(text="Describe"),
                types_pb2.ContentPart(image=types_pb2.Image(data=imagedata.sized_png(1000, 1000)))])]),
            sampling=types_pb2.SamplingParameters(max_tokens=8))
        try:
            list(stub.Chat(req, timeout=60))
        except grpc.RpcError as e:
            return e.code(), e.details(), dict(e.trailing_metadata() or ())
        return grpc.StatusCode.OK, "", {}
