"""The tracer: ids, sampling and recording, what finished spans hold, and reconfiguration on reload.

A batcher with a recording sender stands in for OTLP here (the wire is tested in test_otlp.py and end to end in
tests/e2e/test_tracing.py).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry.trace import SpanKind

from telemetry.export import SpanBatcher
from telemetry.settings import TracingSettings
from telemetry.tracing import Span, Tracer

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
SETTINGS = TracingSettings("http://collector:4318/v1/traces")
NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class Recorded:
    """A sender that keeps the span batches it was given (encoding is the identity on the span list)."""

    def __init__(self) -> None:
        self.batches: list[Sequence[Span]] = []
        self.closed = False

    def send(self, payload: bytes, count: int) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


class Batchers:
    """A batcher factory that keeps what it built: each batcher's spans are collected unencoded."""

    def __init__(self) -> None:
        self.built: list[tuple[TracingSettings, bytes, SpanBatcher, list[Span]]] = []

    def __call__(self, settings: TracingSettings, resource: bytes, scope: bytes) -> SpanBatcher:
        spans: list[Span] = []

        def encode(batch: Sequence[Span]) -> bytes:
            spans.extend(batch)
            return b""

        batcher = SpanBatcher(Recorded(), encode, max_queue=100, delay=0.01)
        self.built.append((settings, resource, batcher, spans))
        return batcher

    def spans(self, index: int = -1) -> list[Span]:
        _, _, batcher, spans = self.built[index]
        assert batcher.flush(5.0)
        return spans


def tracer_with(settings: TracingSettings | None, batchers: Batchers) -> Tracer:
    tracer = Tracer(random.Random(3))
    tracer.configure(settings, "orders", batchers)
    return tracer


def test_without_tracing_ids_exist_but_nothing_is_recorded() -> None:
    batchers = Batchers()
    tracer = tracer_with(None, batchers)
    span, parent = tracer.start_server(NO_HEADERS, 0.0)
    assert parent is None
    assert span.trace_id
    assert span.span_id
    assert not span.recording  # a new trace is not sampled when nothing exports
    assert not span.sampled
    assert len(span.trace_hex) == 32
    assert len(span.span_hex) == 16
    assert batchers.built == []


def test_without_tracing_a_sampled_client_trace_is_still_continued_as_sampled() -> None:
    tracer = tracer_with(None, Batchers())
    span, parent = tracer.start_server(CIMultiDict({"traceparent": f"00-{TRACE}-{SPAN}-01"}), 0.0)
    assert parent is not None
    assert span.trace_hex == TRACE
    assert span.sampled
    assert not span.recording
    client = tracer.start_client(span)
    headers = tracer.context_headers(client, parent)
    assert headers["traceparent"] == f"00-{TRACE}-{client.span_hex}-01"


def test_finished_spans_are_queued_with_links_names_and_events() -> None:
    batchers = Batchers()
    tracer = tracer_with(SETTINGS, batchers)
    server, parent = tracer.start_server(
        CIMultiDict({"traceparent": f"00-{TRACE}-{SPAN}-01", "tracestate": "v=1"}), 0.0
    )
    assert server.recording
    client = tracer.start_client(server)
    client.event("breaker.tripped", {"meshgate.endpoint": "10.0.0.1:80"})
    client.error = True
    tracer.end(client, "GET", {"http.request.method": "GET", "error.type": "reset"})
    server.event("retry", {"http.request.resend_count": 1})
    tracer.end(server, "GET orders", {"http.response.status_code": 200})
    exported = batchers.spans()
    assert [s.name for s in exported] == ["GET", "GET orders"]
    got_client, got_server = exported
    assert got_server.kind is SpanKind.SERVER
    assert got_client.kind is SpanKind.CLIENT
    assert got_server.trace_id == got_client.trace_id == int(TRACE, 16)
    assert got_server.parent_id == int(SPAN, 16)
    assert got_server.remote_parent
    assert got_client.parent_id == server.span_id
    assert not got_client.remote_parent
    assert got_client.error
    assert not got_server.error
    assert [e[0] for e in got_client.events] == ["breaker.tripped"]
    assert [e[0] for e in got_server.events] == ["retry"]
    assert got_client.attributes == {"http.request.method": "GET", "error.type": "reset"}
    assert 0 < got_server.start_ns <= got_server.end_ns
    # The upstream continues as a child of the CLIENT span; tracestate is passed on.
    assert tracer.context_headers(client, parent) == {
        "traceparent": f"00-{TRACE}-{client.span_hex}-01",
        "tracestate": "v=1",
    }
    assert tracer.counts() == {"exported": 2, "dropped": 0, "failed": 0}


def test_the_resource_names_the_service() -> None:
    batchers = Batchers()
    tracer_with(SETTINGS, batchers)
    resource = batchers.built[0][1]
    assert b"service.name" in resource
    assert b"orders" in resource


def test_unsampled_requests_record_nothing() -> None:
    batchers = Batchers()
    tracer = tracer_with(TracingSettings(SETTINGS.otlp_endpoint, sample_ratio=0.0), batchers)
    span, _ = tracer.start_server(NO_HEADERS, 0.0)
    assert not span.sampled
    assert not span.recording
    span.event("retry")
    assert span.events == []
    client = tracer.start_client(span)
    assert tracer.context_headers(client, None)["traceparent"].endswith("-00")


def test_client_unsampled_decision_is_followed() -> None:
    tracer = tracer_with(SETTINGS, Batchers())
    span, _ = tracer.start_server(CIMultiDict({"traceparent": f"00-{TRACE}-{SPAN}-00"}), 0.0)
    assert not span.sampled
    assert not span.recording


def test_reload_keeps_the_batcher_when_only_sampling_changes() -> None:
    batchers = Batchers()
    tracer = tracer_with(SETTINGS, batchers)
    tracer.configure(TracingSettings(SETTINGS.otlp_endpoint, sample_ratio=0.0), "orders", batchers)
    assert len(batchers.built) == 1
    span, _ = tracer.start_server(NO_HEADERS, 0.0)
    assert not span.sampled


def test_reload_with_a_new_endpoint_builds_a_new_batcher_and_retires_the_old() -> None:
    batchers = Batchers()
    tracer = tracer_with(SETTINGS, batchers)
    span, _ = tracer.start_server(NO_HEADERS, 0.0)
    tracer.end(span, "GET", {})
    tracer.configure(TracingSettings("http://other:4318/v1/traces"), "orders", batchers)
    assert len(batchers.built) == 2
    # The old batcher sends what it held, then stops; its counts stay in the totals.
    old = batchers.built[0][2]
    old._thread.join(5.0)
    assert not old._thread.is_alive()
    assert batchers.spans(0) == [span]
    span, _ = tracer.start_server(NO_HEADERS, 0.0)
    tracer.end(span, "GET", {})
    assert batchers.spans(1) == [span]
    deadline = time.monotonic() + 5.0  # the retiring thread adds the old batcher's counts once it has stopped
    while tracer.counts()["exported"] != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tracer.counts()["exported"] == 2


def test_tracing_removed_on_reload_stops_recording() -> None:
    batchers = Batchers()
    tracer = tracer_with(SETTINGS, batchers)
    tracer.configure(None, "orders", batchers)
    span, _ = tracer.start_server(NO_HEADERS, 0.0)
    assert not span.recording
    assert not tracer.exporting


def test_ids_are_random_and_never_zero() -> None:
    tracer = tracer_with(None, Batchers())
    spans = [tracer.start_server(NO_HEADERS, 0.0)[0] for _ in range(1000)]
    assert len({s.trace_id for s in spans}) == 1000
    assert all(s.trace_id and s.span_id for s in spans)


def test_an_exporter_that_cannot_be_built_leaves_tracing_as_it_was() -> None:
    batchers = Batchers()
    tracer = tracer_with(SETTINGS, batchers)

    def broken(settings: TracingSettings, resource: bytes, scope: bytes) -> SpanBatcher:
        raise ValueError("bad OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE")

    tracer.configure(TracingSettings("http://other:4318/v1/traces", sample_ratio=0.0), "orders", broken)
    span, _ = tracer.start_server(NO_HEADERS, 0.0)
    assert span.recording  # the old sampler and exporter still serve
    tracer.end(span, "GET", {})
    assert batchers.spans() == [span]
    # The same settings again are retried, not skipped as "already applied".
    tracer.configure(TracingSettings("http://other:4318/v1/traces", sample_ratio=0.0), "orders", batchers)
    assert len(batchers.built) == 2
