"""The OTLP test receivers decode what the real OpenTelemetry SDK exporters put on the wire.

The e2e tracing tests trust ``tests/otlp_receiver.py`` to report the gateway's spans faithfully; this proves it
against the reference exporters (OTLP/HTTP protobuf, plain and gzip; OTLP/gRPC), over real loopback sockets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from tests.otlp_receiver import OtlpGrpcReceiver, OtlpHttpReceiver, OtlpReceiver, ReceivedSpan


@pytest.fixture
def http_receiver() -> Iterator[OtlpHttpReceiver]:
    with OtlpHttpReceiver() as receiver:
        yield receiver


@pytest.fixture
def grpc_receiver() -> Iterator[OtlpGrpcReceiver]:
    with OtlpGrpcReceiver() as receiver:
        yield receiver


def _emit(exporter: SpanExporter) -> tuple[str, str, str]:
    """A parent SERVER span with a CLIENT child, attributes of every kind, events and an error status, exported
    through a BatchSpanProcessor; returns (trace id, parent span id, child span id) in hex."""
    provider = TracerProvider(resource=Resource.create({"service.name": "receiver-test", "deployment.tier": 3}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=50))
    try:
        tracer = provider.get_tracer("meshgate-test-scope")
        with tracer.start_as_current_span("GET orders", kind=SpanKind.SERVER) as parent:
            parent.set_attribute("http.request.method", "GET")
            parent.set_attribute("http.response.status_code", 503)
            parent.set_attribute("retried", True)
            parent.set_attribute("ratio", 0.25)
            parent.set_attribute("hops", ["a", "b"])
            parent.add_event("retry", {"http.request.resend_count": 1, "meshgate.retry.reason": "503"})
            parent.set_status(Status(StatusCode.ERROR, "upstream said 503"))
            with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT) as child:
                child.set_attribute("server.port", 9001)
                child.add_event("breaker.tripped")
        assert provider.force_flush(10_000)
    finally:
        provider.shutdown()
    parent_context, child_context = parent.get_span_context(), child.get_span_context()
    return (
        f"{parent_context.trace_id:032x}",
        f"{parent_context.span_id:016x}",
        f"{child_context.span_id:016x}",
    )


def _check(receiver: OtlpReceiver, ids: tuple[str, str, str]) -> None:
    trace_id, parent_id, child_id = ids
    spans = receiver.wait_for(lambda span: span.trace_id == trace_id, timeout=10, count=2)
    by_kind: dict[str, ReceivedSpan] = {span.kind: span for span in spans}
    assert set(by_kind) == {"SERVER", "CLIENT"}
    parent, child = by_kind["SERVER"], by_kind["CLIENT"]

    assert (parent.span_id, parent.parent_span_id, parent.name) == (parent_id, "", "GET orders")
    assert (child.span_id, child.parent_span_id, child.name) == (child_id, parent_id, "GET")
    assert parent.attributes == {
        "http.request.method": "GET",
        "http.response.status_code": 503,
        "retried": True,
        "ratio": 0.25,
        "hops": ["a", "b"],
    }
    assert child.attributes == {"server.port": 9001}
    assert parent.events == [("retry", {"http.request.resend_count": 1, "meshgate.retry.reason": "503"})]
    assert parent.event("retry") == [{"http.request.resend_count": 1, "meshgate.retry.reason": "503"}]
    assert child.events == [("breaker.tripped", {})]
    assert (parent.status_code, parent.status_message) == ("ERROR", "upstream said 503")
    assert child.status_code == "UNSET"
    for span in (parent, child):
        assert span.resource["service.name"] == "receiver-test"
        assert span.resource["deployment.tier"] == 3
        assert span.scope == "meshgate-test-scope"
        assert 0 < span.start_ns <= span.end_ns
        assert abs(span.start_ns - time.time_ns()) < 60 * 10**9
    assert parent.start_ns <= child.start_ns <= child.end_ns <= parent.end_ns
    assert receiver.requests >= 1
    assert receiver.errors == []


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip, Compression.Deflate])
def test_http_receiver_decodes_the_sdk_exporter(http_receiver: OtlpHttpReceiver, compression: Compression) -> None:
    exporter = HttpExporter(endpoint=http_receiver.endpoint + "/v1/traces", compression=compression, timeout=5)
    _check(http_receiver, _emit(exporter))


def test_grpc_receiver_decodes_the_sdk_exporter(grpc_receiver: OtlpGrpcReceiver) -> None:
    exporter = GrpcExporter(endpoint=grpc_receiver.endpoint, insecure=True, timeout=5)
    _check(grpc_receiver, _emit(exporter))


async def test_receivers_serve_from_inside_a_running_event_loop(
    http_receiver: OtlpHttpReceiver, grpc_receiver: OtlpGrpcReceiver
) -> None:
    # An async test's loop is blocked while the SDK exports synchronously; the receivers run on their own loops.
    exporters: list[Callable[[], SpanExporter]] = [
        lambda: HttpExporter(endpoint=http_receiver.traces_url, timeout=5),
        lambda: GrpcExporter(endpoint=grpc_receiver.endpoint, insecure=True, timeout=5),
    ]
    for receiver, make in zip((http_receiver, grpc_receiver), exporters, strict=True):
        _check(receiver, _emit(make()))


def test_wait_for_times_out_with_what_arrived(http_receiver: OtlpHttpReceiver) -> None:
    _emit(HttpExporter(endpoint=http_receiver.traces_url, timeout=5))
    with pytest.raises(TimeoutError, match="GET orders"):
        http_receiver.wait_for(lambda span: span.name == "never", timeout=0.2)
    assert len(http_receiver.spans) == 2
    http_receiver.clear()
    assert (http_receiver.spans, http_receiver.requests) == ([], 0)


def test_a_failing_http_receiver_answers_its_status(http_receiver: OtlpHttpReceiver) -> None:
    import urllib.error
    import urllib.request

    http_receiver.status = 503
    exporter = HttpExporter(endpoint=http_receiver.traces_url, timeout=1)
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=50))
    with provider.get_tracer("t").start_as_current_span("lost"):
        pass
    provider.force_flush(5_000)
    provider.shutdown()
    assert http_receiver.wait_for(lambda span: span.name == "lost")
    request = urllib.request.Request(
        http_receiver.traces_url, data=b"", headers={"Content-Type": "application/json"}, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 415
    refused.value.close()
