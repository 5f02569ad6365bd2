"""The tracing component's environment, as the kubelet would build it for a pod, gives the front
door's spans the resource the manifests promise (service and pod), received by a real OTLP
collector service on loopback. Front door only: no engine."""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from conftest import start_preprocess
from kimivl.client import Client, InvalidArgument
from test_k8s import PREPROCESS, _container, _deployments, _env

POD = {"metadata.name": "kimivl-preprocess-5f7c9d8b4-q9z2k", "metadata.namespace": "kimivl",
       "spec.nodeName": "cpu-node-1"}


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.resources: list[dict[str, str]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                self.resources.append({a.key: a.value.string_value for a in rs.resource.attributes})
        return trace_service_pb2.ExportTraceServiceResponse()


def test_tracing_component_resource_reaches_the_collector(tiny_model):
    docs, deploys = _deployments("cpu-dev+tracing")
    env = _env(docs, _container(deploys[PREPROCESS]), POD)
    otel = {k: v for k, v in env.items() if k.startswith("OTEL_")}
    assert {"OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"} <= set(otel)
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    srv = start_preprocess("localhost:1", extra=["--otlp-traces-endpoint", f"http://127.0.0.1:{port}"],
                           env={**otel, "OTEL_BSP_SCHEDULE_DELAY": "100"})
    try:
        srv.wait_serving(180)
        with Client(srv.target, timeout_s=30) as c, pytest.raises(InvalidArgument):
            c.chat(["x"], sampling={"temperature": 9})  # refused at the front door: one span
        deadline = time.monotonic() + 30
        while not collector.resources:
            assert time.monotonic() < deadline, f"no spans arrived; see {srv.log_path}"
            time.sleep(0.2)
    finally:
        srv.stop()
        server.stop(0)
    resource = collector.resources[0]
    assert resource["service.name"] == "kimivl-preprocess"
    assert resource["k8s.pod.name"] == POD["metadata.name"]
    assert resource["k8s.namespace.name"] == "kimivl" and resource["k8s.node.name"] == "cpu-node-1"
    assert resource["k8s.deployment.name"] == "kimivl-preprocess"
