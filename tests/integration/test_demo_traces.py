"""``python -m gateway.demo.traces``, the demo's local stand-in for Jaeger, as a real process on loopback.

Spans are exported by the real OpenTelemetry SDK exporter (OTLP/HTTP protobuf, gzip) and read back through the Jaeger
query API shapes the demo and the docs point at: a trace by id, a search by service and tags (how an SRE finds a
request by ``meshgate.route``, ``http.response.status_code`` or ``meshgate.authz.decision_id``), services and
operations, Jaeger's error shape, eviction, the per-trace span bound, bad bodies, a port in use, clean stops.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from tests.procs import ROOT, free_port, stop, wait_http

PROTOBUF = "application/x-protobuf"
NOT_FOUND = {"data": None, "total": 0, "limit": 0, "offset": 0, "errors": [{"code": 404, "msg": "trace not found"}]}
SPAN_KEYS = {"traceID", "spanID", "operationName", "references", "startTime", "duration", "tags", "logs", "processID"}


@dataclass
class Store:
    process: subprocess.Popen[bytes]
    otlp: int
    query: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.otlp}/v1/traces"

    def get(self, path: str, **params: str) -> tuple[int, Any]:
        """GET on the query port with URL-encoded ``params``: (status, decoded JSON body)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.query}{path}{query}", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.loads(error.read())

    def search(self, **params: str) -> list[str]:
        """The trace ids ``/api/traces`` finds, in the order it answers."""
        status, body = self.get("/api/traces", **params)
        assert status == 200, body
        assert body["errors"] is None
        return [trace["traceID"] for trace in body["data"]]

    def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.headers.get_content_type(), response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.headers.get_content_type(), error.read()


def _start(*args: str, otlp: int | None = None, query: int | None = None) -> subprocess.Popen[bytes]:
    otlp, query = otlp or free_port(), query or free_port()
    argv = [sys.executable, "-m", "gateway.demo.traces", "--otlp", f"127.0.0.1:{otlp}", "--query", f"127.0.0.1:{query}"]
    return subprocess.Popen([*argv, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@contextmanager
def running(*args: str, stop_signal: int = signal.SIGTERM) -> Iterator[Store]:
    """The store as a real process on free ports; on the way out it must stop on ``stop_signal`` with exit 0, having
    printed exactly its one listening line."""
    otlp, query = free_port(), free_port()
    process = _start(*args, otlp=otlp, query=query)
    try:
        wait_http(f"http://127.0.0.1:{query}/api/services", process=process)
        yield Store(process, otlp, query)
    finally:
        process.send_signal(stop_signal)  # once: a second signal could land after the store's handler is gone
        try:
            out, err = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
    assert process.returncode == 0, err.decode()
    assert out.decode() == f"traces: OTLP on http://127.0.0.1:{otlp}, query on http://127.0.0.1:{query}\n"
    assert err == b""


@pytest.fixture(scope="module")
def store() -> Iterator[Store]:
    with running() as found:
        yield found


def _export_request(
    store: Store, decision_id: str, *, service: str = "orders", route: str = "orders", status: int = 403
) -> tuple[str, str, str]:
    """What a gateway exports for one request, through the SDK's OTLP/HTTP exporter with gzip: a SERVER span with
    the route, status and authz decision, and a CLIENT child that failed once. Returns (trace, server, client) ids."""
    resource = Resource.create({"service.name": service, "deployment.environment.name": "demo"})
    provider = TracerProvider(resource=resource)
    exporter = OTLPSpanExporter(endpoint=store.endpoint, compression=Compression.Gzip)
    provider.add_span_processor(SimpleSpanProcessor(exporter))  # each span is exported as it ends
    try:
        tracer = provider.get_tracer("meshgate")
        with tracer.start_as_current_span(f"GET {route}", kind=SpanKind.SERVER) as server:
            server.set_attribute("meshgate.route", route)
            server.set_attribute("http.response.status_code", status)
            server.set_attribute("meshgate.authz.decision_id", decision_id)
            server.set_attribute("meshgate.authz.allowed", status != 403)
            with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT) as client:
                client.set_attribute("server.port", 9001)
                client.add_event("retry", {"http.request.resend_count": 1})
                client.set_status(Status(StatusCode.ERROR, "connection reset"))
    finally:
        provider.shutdown()
    server_context, client_context = server.get_span_context(), client.get_span_context()
    return f"{server_context.trace_id:032x}", f"{server_context.span_id:016x}", f"{client_context.span_id:016x}"


def _tags(span: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    return {tag["key"]: (tag["type"], tag["value"]) for tag in span["tags"]}


def test_a_trace_by_id_in_jaegers_shape(store: Store) -> None:
    decision = str(uuid.uuid4())
    before_us = time.time_ns() // 1000
    trace_id, server_id, client_id = _export_request(store, decision)

    status, body = store.get(f"/api/traces/{trace_id}")
    assert status == 200
    assert {key: body[key] for key in ("total", "limit", "offset", "errors")} == {
        "total": 0, "limit": 0, "offset": 0, "errors": None
    }  # fmt: skip
    [trace] = body["data"]
    assert trace["traceID"] == trace_id
    assert trace["warnings"] is None
    # service.name names the process; the other resource attributes are its tags
    [(process_id, process)] = trace["processes"].items()
    assert (process_id, process["serviceName"]) == ("p1", "orders")
    process_tags = _tags(process)
    assert process_tags["deployment.environment.name"] == ("string", "demo")
    assert process_tags["telemetry.sdk.language"] == ("string", "python")
    assert "service.name" not in process_tags
    spans = {span["spanID"]: span for span in trace["spans"]}
    assert set(spans) == {server_id, client_id}
    server, client = spans[server_id], spans[client_id]
    for span in (server, client):
        assert set(span) == SPAN_KEYS | {"warnings"}
        assert (span["traceID"], span["processID"], span["warnings"]) == (trace_id, "p1", None)
    assert server["references"] == []
    assert client["references"] == [{"refType": "CHILD_OF", "traceID": trace_id, "spanID": server_id}]
    assert (server["operationName"], client["operationName"]) == ("GET orders", "GET")

    # microseconds since the epoch; the child lies within its parent
    assert before_us <= server["startTime"] <= client["startTime"] <= time.time_ns() // 1000
    assert client["startTime"] + client["duration"] <= server["startTime"] + server["duration"] + 1

    assert _tags(server) == {
        "otel.scope.name": ("string", "meshgate"),
        "meshgate.route": ("string", "orders"),
        "http.response.status_code": ("int64", 403),
        "meshgate.authz.decision_id": ("string", decision),
        "meshgate.authz.allowed": ("bool", False),
        "span.kind": ("string", "server"),
    }
    assert server["logs"] == []
    assert _tags(client) == {
        "otel.scope.name": ("string", "meshgate"),
        "server.port": ("int64", 9001),
        "span.kind": ("string", "client"),
        "otel.status_code": ("string", "ERROR"),
        "error": ("bool", True),
        "otel.status_description": ("string", "connection reset"),
    }
    [log] = client["logs"]
    assert client["startTime"] <= log["timestamp"] <= client["startTime"] + client["duration"]
    assert log["fields"] == [
        {"key": "event", "type": "string", "value": "retry"},
        {"key": "http.request.resend_count", "type": "int64", "value": 1},
    ]

    # Jaeger takes the id in any case
    assert store.get(f"/api/traces/{trace_id.upper()}") == (200, body)


def test_search_by_service_and_tags(store: Store) -> None:
    denied, allowed = str(uuid.uuid4()), str(uuid.uuid4())
    denied_trace, _, _ = _export_request(store, denied)
    allowed_trace, _, _ = _export_request(store, allowed, status=200)
    payments_trace, _, _ = _export_request(store, denied, service="payments")

    def by(tags: dict[str, str], **params: str) -> list[str]:
        found = store.search(service=params.pop("service", "orders"), tags=json.dumps(tags), **params)
        return [trace_id for trace_id in found if trace_id in (denied_trace, allowed_trace, payments_trace)]

    assert by({"meshgate.authz.decision_id": denied}) == [denied_trace]
    assert by({"meshgate.authz.decision_id": denied}, service="payments") == [payments_trace]
    assert by({"meshgate.authz.decision_id": allowed}) == [allowed_trace]
    assert by({"meshgate.authz.decision_id": "no-such-decision"}) == []
    # ints and booleans compare as Jaeger renders them; every tag must match, on one span
    assert by({"http.response.status_code": "403", "meshgate.authz.decision_id": denied}) == [denied_trace]
    assert by({"http.response.status_code": "200", "meshgate.authz.decision_id": denied}) == []
    assert by({"meshgate.authz.allowed": "true", "meshgate.authz.decision_id": allowed}) == [allowed_trace]
    assert by({"meshgate.authz.decision_id": denied, "span.kind": "client"}) == []  # the decision is on the SERVER span
    assert by({"meshgate.authz.decision_id": denied}, operation="GET orders") == [denied_trace]
    assert by({"meshgate.authz.decision_id": denied}, operation="GET") == []
    assert by({"error": "true", "server.port": "9001"}, limit="0") == [allowed_trace, denied_trace]  # newest first
    assert by({"deployment.environment.name": "demo", "meshgate.authz.decision_id": allowed}) == [allowed_trace]
    assert by({"meshgate.authz.decision_id": denied}, lookback="1h") == [denied_trace]
    assert by({"meshgate.authz.decision_id": denied}, start=str(time.time_ns() // 1000 + 3_600_000_000)) == []
    # Jaeger's other tag syntax, without braces
    assert store.search(service="orders", tag=f"meshgate.authz.decision_id:{denied}") == [denied_trace]

    # the docs' curl line with raw (not URL-encoded) braces and quotes, as `curl -g` sends it
    connection = http.client.HTTPConnection("127.0.0.1", store.query, timeout=5)
    try:
        connection.request("GET", f'/api/traces?service=orders&tags={{"meshgate.authz.decision_id":"{denied}"}}')
        response = connection.getresponse()
        assert response.status == 200
        assert [trace["traceID"] for trace in json.loads(response.read())["data"]] == [denied_trace]
    finally:
        connection.close()


def test_search_returns_the_newest_traces_first_up_to_the_limit(store: Store) -> None:
    route = f"route-{uuid.uuid4()}"
    exported = [_export_request(store, str(uuid.uuid4()), route=route)[0] for _ in range(3)]
    assert store.search(service="orders", tags=json.dumps({"meshgate.route": route})) == exported[::-1]
    assert store.search(service="orders", tags=json.dumps({"meshgate.route": route}), limit="2") == exported[:0:-1]
    assert store.search(service="orders", operation=f"GET {route}") == exported[::-1]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "parameter 'service' is required"),
        ({"service": "orders", "tags": "{not json"}, "malformed 'tags' parameter, cannot unmarshal JSON: "),
        ({"service": "orders", "tags": '"meshgate.route":"orders"'}, "(curl removes {} unless given -g or"),
        ({"service": "orders", "tags": '{"http.response.status_code":403}'}, "want an object of strings"),
        ({"service": "orders", "tag": "no-colon"}, "malformed 'tag' parameter, expecting key:value"),
        ({"service": "orders", "limit": "ten"}, "unable to parse param 'limit'"),
        ({"service": "orders", "lookback": "an hour"}, "unable to parse param 'lookback'"),
    ],
)
def test_a_bad_search_gets_400_in_jaegers_error_shape(store: Store, params: dict[str, str], message: str) -> None:
    status, body = store.get("/api/traces", **params)
    assert status == 400
    assert (body["data"], body["total"], body["limit"], body["offset"]) == (None, 0, 0, 0)
    [error] = body["errors"]
    assert error["code"] == 400
    assert message in error["msg"]


def test_services_and_operations(store: Store) -> None:
    _export_request(store, str(uuid.uuid4()), service="inventory", route="stock")
    status, body = store.get("/api/services")
    assert status == 200
    assert "inventory" in body["data"]
    assert body["data"] == sorted(body["data"])
    assert (body["total"], body["errors"]) == (len(body["data"]), None)
    assert store.get("/api/services/inventory/operations") == (
        200, {"data": ["GET", "GET stock"], "total": 2, "limit": 0, "offset": 0, "errors": None}
    )  # fmt: skip
    assert store.get("/api/services/nobody/operations")[1]["data"] == []


def test_an_unknown_trace_is_404_and_a_bad_id_400(store: Store) -> None:
    assert store.get(f"/api/traces/{uuid.uuid4().hex}") == (404, NOT_FOUND)
    for bad in ("not-hex", "1" * 33):
        status, body = store.get(f"/api/traces/{bad}")
        assert status == 400
        assert body["errors"][0]["code"] == 400


def test_the_index_page_says_what_this_is(store: Store) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{store.query}/", timeout=5) as response:
        text = response.read().decode()
    assert "stand-in for Jaeger in `meshgate demo` only" in text
    for path in (
        "/api/traces/{traceID}",
        "/api/traces?service=",
        "/api/services",
        "/api/services/{service}/operations",
    ):
        assert path in text


def _request(trace_id: bytes, span_id: bytes = b"\x01" * 8) -> bytes:
    message = ExportTraceServiceRequest()
    resource_spans = message.resource_spans.add()
    attribute = resource_spans.resource.attributes.add()
    attribute.key, attribute.value.string_value = "service.name", "raw"
    span = resource_spans.scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = trace_id, span_id, "raw-op"
    span.start_time_unix_nano, span.end_time_unix_nano = 1_700_000_000_000_000_000, 1_700_000_000_002_500_000
    return bytes(message.SerializeToString())


def test_otlp_bodies(store: Store) -> None:
    # A trace id with leading zeros: Jaeger finds it by its 32 hex digits or without the zeros.
    trace_id = bytes(4) + os.urandom(12)
    posts = [
        (gzip.compress(_request(trace_id, b"\x01" * 8)), "gzip"),
        (zlib.compress(_request(trace_id, b"\x02" * 8)), "deflate"),
        (_request(trace_id, b"\x01" * 8), "identity"),  # the first span again, as an exporter's retry sends it
    ]
    for body, encoding in posts:
        status, content_type, reply = store.post(body, {"Content-Type": PROTOBUF, "Content-Encoding": encoding})
        assert (status, content_type) == (200, PROTOBUF)
        assert not ExportTraceServiceResponse.FromString(reply).HasField("partial_success")
    status, body = store.get(f"/api/traces/{trace_id.hex().lstrip('0').upper()}")
    assert status == 200
    [trace] = body["data"]
    assert trace["traceID"] == trace_id.hex()
    assert [(span["spanID"], span["startTime"], span["duration"]) for span in trace["spans"]] == [
        ("01" * 8, 1_700_000_000_000_000, 2500),
        ("02" * 8, 1_700_000_000_000_000, 2500),
    ]
    assert trace["processes"] == {"p1": {"serviceName": "raw", "tags": []}}

    # A span whose ids are not 16/8 bytes is rejected on its own: OTLP's partial success, so no retry.
    status, _, reply = store.post(_request(b"\x01" * 8), {"Content-Type": PROTOBUF})
    assert status == 200
    assert ExportTraceServiceResponse.FromString(reply).partial_success.rejected_spans == 1

    bad = [
        (b"not a protobuf", {}, 400),
        (b"not gzip at all", {"Content-Encoding": "gzip"}, 400),
        (gzip.compress(_request(trace_id))[:-12], {"Content-Encoding": "gzip"}, 400),  # truncated
        (_request(trace_id), {"Content-Encoding": "br"}, 415),
        (b"{}", {"Content-Type": "application/json"}, 415),
    ]
    for body, headers, expected in bad:
        status, _, reply = store.post(body, {"Content-Type": PROTOBUF, **headers})
        assert status == expected, (headers, reply)


def test_the_oldest_traces_are_evicted_and_spans_per_trace_bounded() -> None:
    with running("--max-traces", "3", "--max-spans-per-trace", "2", stop_signal=signal.SIGINT) as store:
        provider = TracerProvider(resource=Resource.create({"service.name": "evict"}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=store.endpoint)))
        try:
            tracer = provider.get_tracer("meshgate")
            roots = []
            for number in range(5):
                with tracer.start_as_current_span(f"request {number}", kind=SpanKind.SERVER) as root:
                    roots.append(f"{root.get_span_context().trace_id:032x}")
            with tracer.start_as_current_span("big", kind=SpanKind.SERVER) as big:
                for child in range(3):
                    with tracer.start_as_current_span(f"child {child}"):
                        pass
        finally:
            provider.shutdown()
        big_id = f"{big.get_span_context().trace_id:032x}"

        for evicted in roots[:3]:
            assert store.get(f"/api/traces/{evicted}") == (404, NOT_FOUND)
        assert store.search(service="evict") == [big_id, roots[4], roots[3]]
        status, body = store.get(f"/api/traces/{big_id}")
        assert status == 200
        [trace] = body["data"]
        assert [span["operationName"] for span in trace["spans"]] == ["child 0", "child 1"]  # in arrival order
        assert trace["warnings"] == ["2 spans dropped: over this demo store's per-trace limit"]
        assert _tags(trace["spans"][0])["span.kind"] == ("string", "internal")


@pytest.mark.parametrize("busy", ["otlp", "query"])
def test_a_port_in_use_is_one_line_and_exit_1(busy: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        process = _start(**{busy: port})
        try:
            out, err = process.communicate(timeout=20)
        finally:
            if process.poll() is None:
                stop(process)
    assert process.returncode == 1
    assert out == b""
    lines = err.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"traces: cannot listen on 127.0.0.1:{port}: ")
    assert "in use" in lines[0]
