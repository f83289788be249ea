"""The hand-written OTLP encoder: its bytes decode, with the real protobuf classes, to exactly what the
OpenTelemetry SDK's own encoder produces for the same spans."""

from __future__ import annotations

import random

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from telemetry.otlp import encode_request, encode_resource, encode_scope
from telemetry.tracing import Attributes, Span

RESOURCE = {"service.name": "orders", "service.instance.id": "host-1", "telemetry.sdk.language": "python"}


def make_span(rng: random.Random, kind: SpanKind, attributes: Attributes, *, parent: int, remote: bool) -> Span:
    span = Span(
        rng.getrandbits(128), rng.getrandbits(64) or 1, parent, kind, sampled=True, recording=True, remote_parent=remote
    )
    span.name = "GET orders" if kind is SpanKind.SERVER else "GET"
    span.attributes = attributes
    span.start_ns = 1_700_000_000_000_000_000 + rng.getrandbits(20)
    span.end_ns = span.start_ns + rng.getrandbits(20)
    return span


def as_sdk(span: Span) -> ReadableSpan:
    """The same span as the SDK represents it."""
    sampled = TraceFlags(TraceFlags.SAMPLED)
    parent = SpanContext(span.trace_id, span.parent_id, span.remote_parent, sampled) if span.parent_id else None
    return ReadableSpan(
        span.name,
        context=SpanContext(span.trace_id, span.span_id, False, sampled),
        parent=parent,
        resource=Resource(RESOURCE),
        attributes=span.attributes,
        events=[Event(name, attributes, time_ns) for name, time_ns, attributes in span.events],
        kind=span.kind,
        status=Status(StatusCode.ERROR) if span.error else Status(StatusCode.UNSET),
        start_time=span.start_ns,
        end_time=span.end_ns,
        instrumentation_scope=InstrumentationScope("meshgate"),
    )


ATTRIBUTE_CASES = [
    {},
    {"http.request.method": "GET", "http.response.status_code": 200, "url.path": "/orders/1"},
    {"s": "", "unicode": "zażółć ☃", "t": True, "f": False, "zero": 0, "neg": -5, "big": 2**62, "pi": 3.25},
    {"list": ["a", "b"], "long": "x" * 5000},  # a long value: multi-byte length prefix
]


@pytest.mark.parametrize("attributes", ATTRIBUTE_CASES)
@pytest.mark.parametrize(
    ("kind", "parent", "remote", "error"),
    [
        (SpanKind.SERVER, 0, False, False),
        (SpanKind.SERVER, 0xB7AD6B7169203331, True, True),
        (SpanKind.CLIENT, 0x1234, False, True),
    ],
)
def test_same_message_as_the_sdk_encoder(
    attributes: Attributes, kind: SpanKind, parent: int, remote: bool, error: bool
) -> None:
    rng = random.Random(5)
    span = make_span(rng, kind, attributes, parent=parent, remote=remote)
    span.error = error
    span.events = [
        ("retry", span.start_ns + 5, {"http.request.resend_count": 1}),
        ("fallback", span.start_ns + 9, None),
    ]
    ours = ExportTraceServiceRequest.FromString(
        encode_request([span], encode_resource(RESOURCE), encode_scope("meshgate"))
    )
    theirs = ExportTraceServiceRequest.FromString(encode_spans([as_sdk(span)]).SerializeToString())
    # One deliberate difference: trace.proto puts the W3C trace flags in the low byte of Span.flags (sampled = 1);
    # SDK 1.45 leaves them out.
    ours_span = ours.resource_spans[0].scope_spans[0].spans[0]
    theirs_span = theirs.resource_spans[0].scope_spans[0].spans[0]
    assert ours_span.flags == theirs_span.flags | 0x01
    ours_span.flags = theirs_span.flags
    assert ours == theirs


def test_a_batch_keeps_order_and_every_span() -> None:
    rng = random.Random(9)
    spans = [
        make_span(rng, SpanKind.SERVER if n % 2 else SpanKind.CLIENT, {"n": n, "route": "r"}, parent=n, remote=False)
        for n in range(600)
    ]
    ours = ExportTraceServiceRequest.FromString(encode_request(spans, encode_resource(RESOURCE), encode_scope("m")))
    (resource_spans,) = ours.resource_spans
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.scope.name == "m"
    assert [s.span_id for s in scope_spans.spans] == [s.span_id.to_bytes(8, "big") for s in spans]
    assert [s.attributes[0].value.int_value for s in scope_spans.spans] == list(range(600))


def test_cached_values_keep_their_type() -> None:
    # 1 and True are equal as dict keys; the cache must not hand back one's encoding for the other.
    rng = random.Random(1)
    first = make_span(rng, SpanKind.SERVER, {"v": 1}, parent=0, remote=False)
    second = make_span(rng, SpanKind.SERVER, {"v": True}, parent=0, remote=False)
    decoded = ExportTraceServiceRequest.FromString(encode_request([first, second], b"", encode_scope("m")))
    values = [s.attributes[0].value for s in decoded.resource_spans[0].scope_spans[0].spans]
    assert values[0].WhichOneof("value") == "int_value"
    assert values[1].WhichOneof("value") == "bool_value"


def test_undecodable_header_bytes_and_huge_ints_never_break_a_batch() -> None:
    # aiohttp decodes header bytes with surrogateescape: a client's stray byte in User-Agent arrives like this.
    rng = random.Random(2)
    span = make_span(
        rng, SpanKind.SERVER, {"user_agent.original": "ab\udcff", "big": 2**64 + 5}, parent=0, remote=False
    )
    decoded = ExportTraceServiceRequest.FromString(encode_request([span], b"", encode_scope("m")))
    attributes = {a.key: a.value for a in decoded.resource_spans[0].scope_spans[0].spans[0].attributes}
    assert attributes["user_agent.original"].string_value == "ab?"
    assert attributes["big"].string_value == str(2**64 + 5)  # as text, not wrapped around to 5
