"""OpenTelemetry traces for both tiers, off unless ``--otlp-traces-endpoint URL`` is given.

vLLM's flag name and behaviour: OTLP over gRPC by default (``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=
http/protobuf`` for HTTP), and the usual ``OTEL_*`` variables honoured by the SDK (service name
and resource attributes, sampler, batch processor timings, exporter headers and TLS). W3C trace
context (``traceparent``/``tracestate``) is taken from the caller's gRPC metadata or HTTP
headers and sent on to the inference tier, whose engine (vLLM, given the same endpoint) adds its
own request span under ours, so one trace shows a request across both tiers.

Off, every helper here is a check of one module attribute: no span objects, no context work.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator

log = logging.getLogger("kimivl.tracing")

enabled = False
_tracer = None
_propagator = None


def configure(service_name: str, endpoint: str | None) -> None:
    """Install the exporter once per process (``endpoint`` None: tracing stays off)."""
    global enabled, _tracer, _propagator
    if not endpoint:
        return
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                              os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
    if protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    provider = TracerProvider(resource=resource(service_name))  # the sampler comes from OTEL_TRACES_SAMPLER
    exporter = (OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
                if not protocol.startswith("http") else OTLPSpanExporter(endpoint=endpoint))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("kimivl")
    _propagator = TraceContextTextMapPropagator()
    enabled = True
    log.info("tracing on: OTLP/%s to %s as %s", protocol, endpoint, service_name)


def resource(service_name: str):
    """The process's resource: OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win over our name.

    (``Resource.create(attrs)`` alone lets ours win, and a bare ``Resource.create()`` merged over
    it carries ``unknown_service:python``.)"""
    from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource

    return Resource.create({SERVICE_NAME: service_name}).merge(OTELResourceDetector().detect())


def shutdown() -> None:
    """Flush what is buffered (at the end of a drain)."""
    if enabled:
        from opentelemetry import trace

        trace.get_tracer_provider().shutdown()


def extract(carrier: Iterable[tuple[str, str]]):
    """The caller's context from gRPC metadata or HTTP headers (None when off or absent)."""
    if not enabled:
        return None
    return _propagator.extract({k.lower(): v for k, v in carrier if isinstance(v, str)})


# Spans are started and ended explicitly, never made "current": a gRPC streaming handler is an
# async generator, resumed in whatever context the server gives each step, so a context attached
# before a ``yield`` could not be detached after it. Children name their parent instead.
def start(name: str, *, parent=None, kind: str = "internal", attributes: dict | None = None):
    """A started span (None when off). ``parent``: a span, or a context from :func:`extract`."""
    if not enabled:
        return None
    from opentelemetry import trace

    if parent is not None and not isinstance(parent, dict) and hasattr(parent, "get_span_context"):
        parent = trace.set_span_in_context(parent)
    k = {"server": trace.SpanKind.SERVER, "client": trace.SpanKind.CLIENT}.get(kind, trace.SpanKind.INTERNAL)
    return _tracer.start_span(name, context=parent, kind=k, attributes=attributes)


def headers(span) -> list[tuple[str, str]]:
    """traceparent/tracestate naming ``span`` as the parent, for an outgoing call."""
    if span is None:
        return []
    from opentelemetry import trace

    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return list(carrier.items())


@contextlib.contextmanager
def child(name: str, parent, **attributes) -> Iterator:
    """A child span of ``parent`` around a block with no ``yield`` inside (None when off)."""
    s = start(name, parent=parent, attributes={f"kimivl.{k}": v for k, v in attributes.items()} or None) \
        if parent is not None else None
    try:
        yield s
    except BaseException as e:
        if s is not None:
            s.record_exception(e)
            end(s, "ERROR")
            s = None
        raise
    finally:
        if s is not None:
            s.end()


def set_attributes(s, **attributes) -> None:
    if s is not None:
        s.set_attributes({f"kimivl.{k}": v for k, v in attributes.items() if v is not None})


def add_event(s, name: str, **attributes) -> None:
    if s is not None:
        s.add_event(name, attributes)


def end(s, code_name: str | None = None) -> None:
    """End ``s`` with the RPC's gRPC status (an error status marks the span failed)."""
    if s is None:
        return
    from opentelemetry.trace import Status, StatusCode

    if code_name is not None:
        s.set_attribute("rpc.grpc.status_code", code_name)
        if code_name != "OK":
            s.set_status(Status(StatusCode.ERROR, code_name))
    s.end()
