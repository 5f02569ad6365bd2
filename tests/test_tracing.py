"""Traces across both tiers, received by a real OTLP collector endpoint on loopback (the
collector protocol's generated gRPC service from opentelemetry-proto)."""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

import imagedata
from conftest import start_inference, start_preprocess
from kimivl.client import Client, InvalidArgument

pytestmark = pytest.mark.engine
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACING_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "100"}  # export every 100 ms, not every 5 s


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.spans: list[tuple[str, object]] = []  # (service.name, Span)
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    self.spans.extend((service, s) for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id_hex: str):
        with self.lock:
            return [(svc, s) for svc, s in self.spans if s.trace_id.hex() == trace_id_hex]


@pytest.fixture(scope="module")
def traced_tiers(tiny_model):
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    endpoint = ["--otlp-traces-endpoint", f"http://127.0.0.1:{port}"]
    inf = start_inference(extra=endpoint, env=TRACING_ENV)
    pre = None
    try:
        inf.wait_serving()
        pre = start_preprocess(inf.target, extra=endpoint, env=TRACING_ENV)
        pre.wait_serving(60)
        yield collector, pre
    finally:
        if pre:
            pre.stop()
        inf.stop()
        server.stop(0)


def _wait_for(collector, names: set[str], timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        spans = collector.of_trace(TRACE_ID)
        if names <= {s.name for _, s in spans}:
            return spans
        time.sleep(0.2)
    raise AssertionError(f"spans {sorted(names - {s.name for _, s in collector.of_trace(TRACE_ID)})} never "
                         f"arrived; got {sorted(s.name for _, s in collector.of_trace(TRACE_ID))}")


def test_one_trace_shows_a_chat_across_both_tiers_under_the_callers_span(traced_tiers):
    collector, pre = traced_tiers
    with Client(pre.target, timeout_s=300, metadata=[("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN}-01")]) as c:
        r = c.chat(["Look", imagedata.photo_jpeg("coffee"), "and tell"], sampling={"max_tokens": 4,
                                                                                   "temperature": 0.0})
    chat, generate = "kimivl.v1.ChatService/Chat", "kimivl.v1.InferenceService/Generate"
    spans = _wait_for(collector, {chat, generate, "preprocess", "image", "image.fetch", "image.decode_and_process",
                                  "prompt.template_and_tokenize", "inference.upload", "inference.Generate",
                                  "validate", "engine_input", "engine.generate"})
    by_name = {s.name: (svc, s) for svc, s in spans}
    svc, front = by_name[chat]
    assert svc == "kimivl-preprocess" and front.parent_span_id.hex() == CALLER_SPAN
    attrs = {a.key: a.value for a in front.attributes}
    assert attrs["kimivl.images"].int_value == 1 and attrs["kimivl.prompt_tokens"].int_value == r.usage.prompt_tokens
    assert attrs["kimivl.answer_tokens"].int_value + attrs["kimivl.thinking_tokens"].int_value == 4
    assert attrs["rpc.grpc.status_code"].string_value == "OK"
    svc, server = by_name[generate]
    client = by_name["inference.Generate"][1]
    # The inference tier's span is the child of the front door's client span: the context crossed.
    assert svc == "kimivl-inference" and server.parent_span_id == client.span_id
    assert client.parent_span_id == front.span_id
    for name in ("validate", "engine_input", "engine.generate"):
        assert by_name[name][1].parent_span_id == server.span_id, name
    image = by_name["image"][1]
    assert by_name["image.decode_and_process"][1].parent_span_id == image.span_id
    assert any(e.name == "first_token" for e in by_name["engine.generate"][1].events)


def test_a_rejection_is_a_failed_span_with_its_status(traced_tiers):
    collector, pre = traced_tiers
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    with Client(pre.target, timeout_s=60, metadata=[("traceparent", f"00-{trace_id}-b7ad6b7169203331-01")]) as c:
        with pytest.raises(InvalidArgument):
            c.chat(["x"], sampling={"temperature": 9})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not collector.of_trace(trace_id):
        time.sleep(0.2)
    (svc, span), = collector.of_trace(trace_id)
    assert {a.key: a.value.string_value for a in span.attributes}["rpc.grpc.status_code"] == "INVALID_ARGUMENT"
    assert span.status.code == 2  # STATUS_CODE_ERROR


@pytest.mark.parametrize("env, expected", [
    ({}, "kimivl-preprocess"),
    ({"OTEL_SERVICE_NAME": "front-door-eu"}, "front-door-eu"),
    ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs,k8s.pod.name=p-1"}, "from-attrs"),
])
def test_the_service_name_is_ours_unless_the_operator_names_it(monkeypatch, env, expected):
    from kimivl_hosting import tracing

    for key in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert tracing.resource("kimivl-preprocess").attributes["service.name"] == expected
