"""Admission budgets (kimivl_hosting.budget) on a real event loop, and a shed answer crossing real
gRPC: the inference tier's pushback makes the front door's retry policy try again at once and give
up in milliseconds, and the front door passes the hint on."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from kimivl_contract import errors
from kimivl_contract.errors import Overloaded
from kimivl_hosting.budget import SHED, Budget
from kimivl_preprocess.inference_client import INFERENCE_SERVICE, InferenceClient, client_status


def _budget(capacity=2, queue=2, wait=0.5, name="test"):
    return Budget(name, capacity, max_queue=queue, max_wait_s=wait, describe="the test tier", unit="slots")


async def test_admits_up_to_capacity_then_queues_in_order_then_sheds():
    b = _budget()
    p1, p2 = await b.acquire(), await b.acquire()
    order = []

    async def waiter(tag):
        permit = await b.acquire()
        order.append(tag)
        return permit

    w1 = asyncio.create_task(waiter("first"))
    await asyncio.sleep(0)
    w2 = asyncio.create_task(waiter("second"))
    await asyncio.sleep(0)
    assert b.queued == 2
    shed_before = SHED.labels("test", "queue_full")._value.get()
    t0 = time.perf_counter()
    with pytest.raises(Overloaded) as e:
        await b.acquire()
    assert time.perf_counter() - t0 < 0.05  # at once: no waiting
    assert "the test tier is at capacity (2 of 2 slots, 2 waiting) and its queue is full (2)" in str(e.value)
    assert SHED.labels("test", "queue_full")._value.get() == shed_before + 1
    p2.release()
    p1.release()
    (await w1).release()
    (await w2).release()
    assert order == ["first", "second"] and b.used == 0 and b.queued == 0


async def test_a_waiter_that_waits_too_long_is_shed_with_a_hint():
    b = _budget(capacity=1, wait=0.2)
    held = await b.acquire()
    with pytest.raises(Overloaded) as e:
        await b.acquire()
    assert "waited 0.2 s (the limit is 0.2 s)" in str(e.value)
    assert 0.05 <= e.value.retry_after_s <= 30
    assert dict(e.value.trailing_metadata("hint"))["grpc-retry-pushback-ms"] == str(e.value.retry_after_ms)
    assert b.queued == 0
    held.release()
    assert b.used == 0


async def test_a_cancelled_waiter_leaves_the_queue_and_lets_the_next_in():
    b = _budget(capacity=3)
    held = await b.acquire(3)
    big = asyncio.create_task(b.acquire(3))  # at the head, blocking the small one behind it
    await asyncio.sleep(0.02)
    small = asyncio.create_task(b.acquire(1))
    await asyncio.sleep(0.02)
    held.release()
    await asyncio.sleep(0.02)
    assert big.done() and not small.done()  # first in, first served
    big.result().release()
    (await small).release()
    held = await b.acquire(3)
    big = asyncio.create_task(b.acquire(3))
    small = asyncio.create_task(b.acquire(1))
    await asyncio.sleep(0.02)
    big.cancel()  # leaving, it no longer blocks the small one
    with pytest.raises(asyncio.CancelledError):
        await big
    held.release()
    (await small).release()
    assert b.used == 0 and b.queued == 0


async def test_more_than_the_capacity_is_admitted_alone_and_zero_means_no_limit():
    b = _budget(capacity=10)
    p = await b.acquire(1000)
    assert b.used == 10
    p.release()
    p.release()  # idempotent
    assert b.used == 0
    free = Budget("free", 0, max_queue=0, max_wait_s=0, describe="x", unit="y")
    assert [await free.acquire(10**9) for _ in range(100)]


async def test_no_queue_sheds_at_once():
    b = Budget("tensors", 100, max_queue=0, max_wait_s=0, describe="tensor memory", unit="bytes")
    held = await b.acquire(80)
    with pytest.raises(Overloaded):
        await b.acquire(30)
    assert (await b.acquire(20)).amount == 20
    held.release()


async def _shedding_inference_tier(waited: bool = False):
    attempts = []

    async def generate(request, context):
        attempts.append(time.perf_counter())
        errors.answer(context, Overloaded("this inference replica is at capacity", retry_after_s=0.7, waited=waited),
                      pushback="now")
        return
        yield  # pragma: no cover

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(INFERENCE_SERVICE, {
        "Generate": grpc.unary_stream_rpc_method_handler(generate)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}", attempts


async def test_the_front_doors_channel_retries_a_shed_request_at_once_and_passes_the_hint_on():
    """With a 3 MB request (the retry buffer must hold it) and grpcio's real retry policy: a
    pushback of 0 would hang the call until its deadline; 1 ms gives three quick attempts."""
    server, target, attempts = await _shedding_inference_tier()
    client = InferenceClient(target, 64 << 20)
    try:
        t0 = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in client.generate(b"\x0a" + b"\x00" * 3_000_000, timeout_s=20):
                pass
        elapsed = time.perf_counter() - t0
    finally:
        await client.close()
        await server.stop(0)
    assert len(attempts) == 3 and elapsed < 5, (len(attempts), elapsed)
    code, details, trailers = client_status(e.value, target)  # an errors.Status
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details == "inference tier unavailable: this inference replica is at capacity; retry after 0.7 s"
    md = dict(trailers)
    assert md["retry-after-ms"] == "700" and md["grpc-retry-pushback-ms"] == "700"
    from google.rpc import error_details_pb2, status_pb2

    packed = status_pb2.Status.FromString(md["grpc-status-details-bin"]).details
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert packed[0].Unpack(info) and info.reason == errors.Reason.OVERLOADED
    assert packed[-1].Unpack(retry) and retry.retry_delay.ToMilliseconds() == 700


async def test_after_a_shed_on_every_replica_the_front_door_refuses_new_chats_before_any_work(tiny_model):
    from kimivl.v1 import chat_pb2, types_pb2
    from kimivl_contract.processor import ProcessorConfig
    from kimivl_preprocess.chat import ChatFlow
    from kimivl_preprocess.pipeline import Preprocessor
    from kimivl_preprocess.pool import ImagePool
    from kimivl_preprocess.sources import FetchPolicy, ImageFetcher

    server, target, attempts = await _shedding_inference_tier()
    pool = ImagePool(ProcessorConfig.from_model_dir(str(tiny_model)), workers=1)
    pre = Preprocessor(str(tiny_model), pool, ImageFetcher(FetchPolicy()), max_images=8)
    client = InferenceClient(target, 64 << 20)
    flow = ChatFlow(pre, client, "uint8")
    request = chat_pb2.ChatRequest(conversation=types_pb2.Conversation(messages=[
        types_pb2.Message(role=types_pb2.ROLE_USER, content=[types_pb2.ContentPart(text="hello")])]))
    try:
        start = await flow.prepare(request)
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in flow.stream(start, request, 20):
                pass
        assert len(attempts) == 3
        with pytest.raises(Overloaded) as e:  # at once: the tier said 0.7 s
            await flow.prepare(request)
        assert "shed the last request on every replica tried" in str(e.value)
        assert 0 < e.value.retry_after_s <= 0.7 and len(attempts) == 3
        await asyncio.sleep(0.8)
        await flow.prepare(request)  # the window has closed
    finally:
        await client.close()
        await server.stop(0)
        pre.close()
        pool.close()


async def _unavailable_tier(answer):
    async def generate(request, context):
        await answer(context)
        return
        yield  # pragma: no cover

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(INFERENCE_SERVICE, {
        "Generate": grpc.unary_stream_rpc_method_handler(generate)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def _failed_call(target):
    client = InferenceClient(target, 1 << 20)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in client.generate(b"", timeout_s=20):
                pass
        return e.value
    finally:
        await client.close()


@pytest.mark.parametrize("own", [True, False])
async def test_an_unavailable_inference_tier_is_relayed_only_in_its_own_words(own):
    """The tier's own UNAVAILABLE (its google.rpc ErrorInfo, domain kimivl) is passed on with its
    hint; any other (gRPC's, naming addresses, or a foreign server's) is logged, not shown."""
    leak = "failed to connect to all addresses; last error: ipv4:10.1.2.3:50051: Connection refused"

    async def answer(context):
        if own:
            errors.answer_with(context, grpc.StatusCode.UNAVAILABLE, "this replica is draining; retry on another",
                               reason=errors.Reason.UNAVAILABLE, retry_after_s=0.1)
        else:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(leak)

    server, target = await _unavailable_tier(answer)
    try:
        s = client_status(await _failed_call(target), target)
    finally:
        await server.stop(0)
    assert s.code == grpc.StatusCode.UNAVAILABLE and "10.1.2.3" not in s.details and target not in s.details
    if own:
        assert s.details == "inference tier unavailable: this replica is draining; retry on another"
        assert errors.own_details(s.trailing_metadata) == (errors.Reason.UNAVAILABLE, pytest.approx(0.1))
    else:
        assert s.details == "inference tier unavailable; retry later"
        assert errors.own_details(s.trailing_metadata) == (errors.Reason.UNAVAILABLE, pytest.approx(1.0))


async def test_after_the_window_one_chat_probes_the_tier_while_the_others_are_still_refused(tiny_model):
    """The first chat after the window goes to the tier alone: shed again, the window reopens;
    admitted (its headers arrive), chats flow again before its reply has ended."""
    from kimivl.v1 import chat_pb2, inference_pb2, types_pb2
    from kimivl_contract.processor import ProcessorConfig
    from kimivl_preprocess.chat import ChatFlow
    from kimivl_preprocess.inference_client import ShedWindow
    from kimivl_preprocess.pipeline import Preprocessor
    from kimivl_preprocess.pool import ImagePool
    from kimivl_preprocess.sources import FetchPolicy, ImageFetcher

    mode = {"shed": True}
    result = inference_pb2.GenerateResponse(result=types_pb2.GenerationResult(finish_reason=types_pb2.FINISH_REASON_STOP))

    async def generate(request, context):
        if mode["shed"]:
            errors.answer(context, Overloaded("this inference replica is at capacity", retry_after_s=0.3),
                          pushback="now")
            return
        await context.send_initial_metadata(())
        await asyncio.sleep(0.5)
        yield result

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(INFERENCE_SERVICE, {
        "Generate": grpc.unary_stream_rpc_method_handler(
            generate, response_serializer=inference_pb2.GenerateResponse.SerializeToString)})])
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    pool = ImagePool(ProcessorConfig.from_model_dir(str(tiny_model)), workers=1)
    pre = Preprocessor(str(tiny_model), pool, ImageFetcher(FetchPolicy()), max_images=8)
    client = InferenceClient(target, 64 << 20)
    flow = ChatFlow(pre, client, "uint8", shed_window=ShedWindow(max_s=1.0))
    request = chat_pb2.ChatRequest(conversation=types_pb2.Conversation(messages=[
        types_pb2.Message(role=types_pb2.ROLE_USER, content=[types_pb2.ContentPart(text="hello")])]))

    async def run(start):
        return [m async for m in flow.stream(start, request, 20)]

    try:
        with pytest.raises(grpc.aio.AioRpcError):
            await run(await flow.prepare(request))
        await asyncio.sleep(0.35)
        probe = await flow.prepare(request)
        assert probe.probe
        with pytest.raises(Overloaded, match="a probe is checking"):
            await flow.prepare(request)  # refused while the probe is out, before any work
        with pytest.raises(grpc.aio.AioRpcError):
            await run(probe)  # shed again
        with pytest.raises(Overloaded, match="shed the last request on every replica tried; retry after 0.[123]"):
            await flow.prepare(request)  # the window is open again, for the new hint
        mode["shed"] = False
        await asyncio.sleep(0.35)
        probe = await flow.prepare(request)
        assert probe.probe
        probing = asyncio.create_task(run(probe))
        await asyncio.sleep(0.2)  # the tier has sent its headers, not yet its reply
        assert not probing.done()
        after = await flow.prepare(request)
        assert not after.probe
        assert len(await probing) == 1 and len(await run(after)) == 1
    finally:
        await client.close()
        await server.stop(0)
        pre.close()
        pool.close()


async def test_a_chat_that_waited_for_the_front_door_is_refused_if_the_tier_began_shedding_meanwhile(tiny_model):
    """The window is checked on arrival and again once the chat holds the front door's permit:
    a chat queued while the tier began shedding is refused then, before any preprocessing, not
    preprocessed to be shed by the tier."""
    from kimivl.v1 import chat_pb2, types_pb2
    from kimivl_contract.processor import ProcessorConfig
    from kimivl_preprocess.admission import FrontDoorBudgets
    from kimivl_preprocess.chat import ChatFlow
    from kimivl_preprocess.inference_client import ShedWindow
    from kimivl_preprocess.pipeline import Preprocessor
    from kimivl_preprocess.pool import ImagePool
    from kimivl_preprocess.sources import FetchPolicy, ImageFetcher

    server, target, _ = await _shedding_inference_tier()
    pool = ImagePool(ProcessorConfig.from_model_dir(str(tiny_model)), workers=1)
    budgets = FrontDoorBudgets.from_options(max_preparing=1, max_queued=4, max_queue_wait_s=5)
    pre = Preprocessor(str(tiny_model), pool, ImageFetcher(FetchPolicy()), max_images=8, budgets=budgets)
    client = InferenceClient(target, 64 << 20)
    flow = ChatFlow(pre, client, "uint8", shed_window=ShedWindow(max_s=1.0))
    request = chat_pb2.ChatRequest(conversation=types_pb2.Conversation(messages=[
        types_pb2.Message(role=types_pb2.ROLE_USER, content=[types_pb2.ContentPart(text="hello")])]))
    try:
        held = await budgets.requests.acquire()  # the front door's only slot
        queued = asyncio.create_task(flow.prepare(request))
        await asyncio.sleep(0.05)
        assert budgets.requests.queued == 1  # past the window's first check, waiting
        flow.shed_window.observe(await _failed_call(target))  # meanwhile the tier sheds a chat
        held.release()
        with pytest.raises(Overloaded, match="shed the last request on every replica tried"):
            await queued
        assert budgets.requests.used == 0 and budgets.requests.queued == 0
    finally:
        await client.close()
        await server.stop(0)
        pre.close()
        pool.close()


async def test_a_request_that_waited_its_turn_is_not_retried():
    """Shed after its whole queue wait, a request is answered (pushback -1): a retry would wait again."""
    server, target, attempts = await _shedding_inference_tier(waited=True)
    client = InferenceClient(target, 64 << 20)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in client.generate(b"\x0a" + b"\x00" * 1000, timeout_s=20):
                pass
    finally:
        await client.close()
        await server.stop(0)
    assert len(attempts) == 1
    assert dict(e.value.trailing_metadata())["grpc-retry-pushback-ms"] == "-1"
    s = client_status(e.value, target)  # the client still gets the hint
    assert s.details.endswith("retry after 0.7 s") and dict(s.trailing_metadata)["retry-after-ms"] == "700"


async def test_a_request_that_would_wait_too_long_is_shed_on_arrival():
    """Once releases show the pace (two holders, each held ~0.2 s: a release every ~0.1 s), the
    fourth waiter would wait ~0.4 s > the 0.36 s limit: refused at once, not after 0.36 s; a
    client's deadline shorter than the wait is refused at once too."""
    from kimivl_hosting.budget import PREDICT_AFTER_RELEASES

    b = _budget(capacity=2, queue=10, wait=0.36, name="predict")
    for _ in range(PREDICT_AFTER_RELEASES):
        permits = [await b.acquire(), await b.acquire()]
        await asyncio.sleep(0.2)
        for p in permits:
            p.release()
    held = [await b.acquire(), await b.acquire()]
    waiters = [asyncio.create_task(b.acquire()) for _ in range(2)]
    await asyncio.sleep(0.01)
    assert b.queued == 2 and 0.29 < b.expected_wait_s() < 0.36  # the third waiter: ~0.3 s
    shed_before = SHED.labels("predict", "expected_wait")._value.get()
    waiters.append(asyncio.create_task(b.acquire()))  # ~0.3 s: still within the limit
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    with pytest.raises(Overloaded) as e:
        await b.acquire()  # ~0.4 s ahead
    assert time.perf_counter() - t0 < 0.05
    assert "the wait ahead is about 0.4 s (the limit is 0.36 s)" in str(e.value)
    assert 0.36 < e.value.retry_after_s < 0.6
    with pytest.raises(Overloaded, match=r"the limit is 0\.05 s, the request's deadline"):
        await b.acquire(deadline_s=0.05)
    assert SHED.labels("predict", "expected_wait")._value.get() == shed_before + 2
    for p in held:
        p.release()
    for w in waiters:
        (await w).release()
    assert b.used == 0 and b.queued == 0


async def test_no_prediction_before_releases_show_the_pace():
    """A fresh budget has no hold times to go by: a newcomer waits (and may be admitted)."""
    b = _budget(capacity=1, queue=2, wait=0.5, name="fresh")
    held = await b.acquire()
    waiter = asyncio.create_task(b.acquire())
    await asyncio.sleep(0.05)
    held.release()
    (await waiter).release()
