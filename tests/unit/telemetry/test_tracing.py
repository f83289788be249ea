"""The tracer: ids, sampling and recording, span shapes handed to the SDK, and reconfiguration on reload.

The SDK's in-memory exporter stands in for OTLP here (the wire is tested end to end in tests/e2e/test_tracing.py).
"""

from __future__ import annotations

import random
import threading

from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from telemetry.settings import TracingSettings
from telemetry.tracing import Tracer

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
SETTINGS = TracingSettings("http://collector:4318/v1/traces")


class Processors:
    """A processor factory that keeps what it built, each with its own in-memory exporter."""

    def __init__(self) -> None:
        self.built: list[tuple[TracingSettings, InMemorySpanExporter, SpanProcessor]] = []

    def __call__(self, settings: TracingSettings) -> SpanProcessor:
        exporter = InMemorySpanExporter()
        processor = SimpleSpanProcessor(exporter)
        self.built.append((settings, exporter, processor))
        return processor

    @property
    def exporter(self) -> InMemorySpanExporter:
        return self.built[-1][1]


def tracer_with(settings: TracingSettings | None, processors: Processors) -> Tracer:
    tracer = Tracer(random.Random(3))
    tracer.configure(settings, "orders", processors)
    return tracer


def test_without_tracing_ids_exist_but_nothing_is_recorded() -> None:
    processors = Processors()
    tracer = tracer_with(None, processors)
    span, parent = tracer.start_server({}, 0.0)
    assert parent is None
    assert span.trace_id
    assert span.span_id
    assert not span.recording
    assert not span.sampled
    assert len(span.trace_hex) == 32
    assert len(span.span_hex) == 16
    assert processors.built == []


def test_without_tracing_a_sampled_client_trace_is_still_continued_as_sampled() -> None:
    tracer = tracer_with(None, Processors())
    span, parent = tracer.start_server({"traceparent": f"00-{TRACE}-{SPAN}-01"}, 0.0)
    assert parent is not None
    assert span.trace_hex == TRACE
    assert span.sampled
    assert not span.recording
    client = tracer.start_client(span)
    headers = tracer.context_headers(client, parent)
    assert headers["traceparent"] == f"00-{TRACE}-{client.span_hex}-01"


def test_server_and_client_spans_are_exported_with_links_and_status() -> None:
    processors = Processors()
    tracer = tracer_with(SETTINGS, processors)
    server, parent = tracer.start_server({"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "v=1"}, 0.0)
    assert server.recording
    client = tracer.start_client(server)
    client.event("breaker.tripped", {"meshgate.endpoint": "10.0.0.1:80"})
    client.error = True
    tracer.end(client, "GET", {"http.request.method": "GET", "error.type": "reset"})
    server.event("retry", {"http.request.resend_count": 1})
    tracer.end(server, "GET orders", {"http.response.status_code": 200})
    exported = processors.exporter.get_finished_spans()
    assert [s.name for s in exported] == ["GET", "GET orders"]
    got_client, got_server = exported
    assert got_server.kind is SpanKind.SERVER
    assert got_client.kind is SpanKind.CLIENT
    assert got_server.context.trace_id == got_client.context.trace_id == int(TRACE, 16)
    assert got_server.parent is not None
    assert got_server.parent.span_id == int(SPAN, 16)
    assert got_server.parent.is_remote
    assert got_client.parent is not None
    assert got_client.parent.span_id == server.span_id
    assert not got_client.parent.is_remote
    assert got_client.status.status_code is StatusCode.ERROR
    assert got_server.status.status_code is StatusCode.UNSET
    assert [e.name for e in got_client.events] == ["breaker.tripped"]
    assert [e.name for e in got_server.events] == ["retry"]
    assert got_server.resource.attributes["service.name"] == "orders"
    assert got_server.instrumentation_scope is not None
    assert got_server.instrumentation_scope.name == "meshgate"
    assert got_server.start_time is not None
    assert got_server.end_time is not None
    assert got_server.start_time <= got_server.end_time
    # The upstream continues as a child of the CLIENT span; tracestate is passed on.
    assert tracer.context_headers(client, parent) == {
        "traceparent": f"00-{TRACE}-{client.span_hex}-01",
        "tracestate": "v=1",
    }


def test_unsampled_requests_record_nothing() -> None:
    processors = Processors()
    tracer = tracer_with(TracingSettings(SETTINGS.otlp_endpoint, sample_ratio=0.0), processors)
    span, _ = tracer.start_server({}, 0.0)
    assert not span.sampled
    assert not span.recording
    span.event("retry")
    assert span.events == []
    client = tracer.start_client(span)
    assert tracer.context_headers(client, None)["traceparent"].endswith("-00")


def test_client_unsampled_decision_is_followed() -> None:
    tracer = tracer_with(SETTINGS, Processors())
    span, _ = tracer.start_server({"traceparent": f"00-{TRACE}-{SPAN}-00"}, 0.0)
    assert not span.sampled
    assert not span.recording


def test_reload_keeps_the_processor_when_only_sampling_changes() -> None:
    processors = Processors()
    tracer = tracer_with(SETTINGS, processors)
    tracer.configure(TracingSettings(SETTINGS.otlp_endpoint, sample_ratio=0.0), "orders", processors)
    assert len(processors.built) == 1
    span, _ = tracer.start_server({}, 0.0)
    assert not span.sampled


def test_reload_with_a_new_endpoint_builds_a_new_processor_and_retires_the_old() -> None:
    processors = Processors()
    tracer = tracer_with(SETTINGS, processors)
    _, old_exporter, old_processor = processors.built[0]
    shut = threading.Event()
    original = old_processor.shutdown

    def shutdown() -> None:
        original()
        shut.set()

    old_processor.shutdown = shutdown  # type: ignore[method-assign]
    tracer.configure(TracingSettings("http://other:4318/v1/traces"), "orders", processors)
    assert len(processors.built) == 2
    assert shut.wait(5.0)
    span, _ = tracer.start_server({}, 0.0)
    tracer.end(span, "GET", {})
    assert len(processors.exporter.get_finished_spans()) == 1
    assert old_exporter.get_finished_spans() == ()


def test_tracing_removed_on_reload_stops_recording() -> None:
    processors = Processors()
    tracer = tracer_with(SETTINGS, processors)
    tracer.configure(None, "orders", processors)
    span, _ = tracer.start_server({}, 0.0)
    assert not span.recording
    assert not tracer.exporting


def test_ids_are_random_and_never_zero() -> None:
    tracer = tracer_with(None, Processors())
    spans = [tracer.start_server({}, 0.0)[0] for _ in range(1000)]
    assert len({s.trace_id for s in spans}) == 1000
    assert all(s.trace_id and s.span_id for s in spans)
