"""e2e: distributed tracing from outside. A real ``meshgate run`` exports OTLP to a real receiver
(``tests/otlp_receiver.py``) while real upstream processes echo back the trace headers they were sent.

What is checked: one SERVER span per request and one CLIENT span per upstream attempt, with the HTTP semantic-
convention attributes and meshgate's own; W3C ``traceparent``/``tracestate``/``baggage`` continued from the client
to the upstream (the upstream's parent is the gateway's CLIENT span); B3 when configured; retries, rate limits,
fallbacks, breakers and ejections as span events; trace ids in local replies, in the access log and as exemplars on
the latency histogram; parent-based ratio sampling and the per-second cap; and a collector that is down or hung
never slowing or failing a request.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import re
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from tests.otlp_receiver import OtlpGrpcReceiver, OtlpHttpReceiver, OtlpReceiver, ReceivedSpan
from tests.procs import Gateway, gateway, metric_sum, stop

pytestmark = pytest.mark.e2e

NO_BREAKER = {"consecutive_failures": 0}  # keep failing endpoints in rotation: tests count exact attempts
BATCH = {"max_queue": 2048, "delay": "100ms"}  # export quickly: the tests wait for spans
USER_AGENT = "meshgate-tracing-test/1.0"
HEX32 = re.compile(r"[0-9a-f]{32}")
HEX16 = re.compile(r"[0-9a-f]{16}")
TRACEPARENT = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace_id>[0-9a-f]{32})-(?P<parent_id>[0-9a-f]{16})-(?P<flags>[0-9a-f]{2})"
)
FALLBACK_BODY = '{"error": "orders_unavailable"}'


# --- helpers -----------------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes
    request_id: str
    elapsed: float

    def json(self) -> Any:
        return json.loads(self.body)

    def upstream_headers(self) -> dict[str, str]:
        """The request headers the upstream received (the example upstream's echo)."""
        headers: dict[str, str] = self.json()["headers"]
        return headers


def fetch(gw: Gateway, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Reply:
    """One request through the gateway with its own ``x-request-id``; any status is returned, none raised."""
    request_id = uuid.uuid4().hex
    sent = {"x-request-id": request_id, "user-agent": USER_AGENT, **(headers or {})}
    connection = http.client.HTTPConnection("127.0.0.1", gw.listen, timeout=10)
    started = time.monotonic()
    try:
        connection.request(method, path, headers=sent)
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    elapsed = time.monotonic() - started
    return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, body, request_id, elapsed)


def parse_traceparent(value: str) -> dict[str, str]:
    match = TRACEPARENT.fullmatch(value)
    assert match, f"not a W3C traceparent: {value!r}"
    parts = match.groupdict()
    assert parts["version"] == "00"
    assert parts["trace_id"] != "0" * 32
    assert parts["parent_id"] != "0" * 16
    return parts


def server_span(receiver: OtlpReceiver, request_id: str, timeout: float = 10) -> ReceivedSpan:
    """The SERVER span of the request with ``request_id`` (its ``meshgate.request_id``)."""
    [span] = receiver.wait_for(
        lambda s: s.kind == "SERVER" and s.attributes.get("meshgate.request_id") == request_id, timeout
    )
    return span


def client_spans(receiver: OtlpReceiver, server: ReceivedSpan, count: int, timeout: float = 10) -> list[ReceivedSpan]:
    """The CLIENT spans under ``server``, at least ``count`` of them, in start order."""
    spans = receiver.wait_for(
        lambda s: s.kind == "CLIENT" and s.trace_id == server.trace_id and s.parent_span_id == server.span_id,
        timeout,
        count=count,
    )
    return sorted(spans, key=lambda s: s.start_ns)


def read_log(gw: Gateway) -> list[dict[str, Any]]:
    lines = []
    for line in gw.log_path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue  # the last line may be half written
    return lines


def log_lines(gw: Gateway, request_id: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every log line of one request, once its access-log line is there (access lines are flushed every 0.5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in read_log(gw) if line.get("request_id") == request_id]
        if any(line.get("event") == "request" for line in lines):
            return lines
        assert time.monotonic() < deadline, f"no access-log line for {request_id}"
        time.sleep(0.1)


def tracing(endpoint: str, **overrides: Any) -> dict[str, Any]:
    return {"tracing": {"otlp_endpoint": endpoint, "sample_ratio": 1.0, "batch": BATCH, **overrides}}


def simple_config(service: str, upstream_port: int, telemetry: dict[str, Any]) -> dict[str, Any]:
    return {
        "service": service,
        "routes": [{"name": "echo", "match": {"path_prefix": "/echo/"}, "cluster": "a", "rewrite": {"prefix": "/"}}],
        "clusters": [{"name": "a", "endpoints": [f"127.0.0.1:{upstream_port}"]}],
        "telemetry": telemetry,
    }


# --- processes ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refused_port() -> Iterator[int]:
    """Bound but not listening: a connection is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpHttpReceiver]:
    with OtlpHttpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory,
    receiver: OtlpHttpReceiver,
    upstream_a: int,
    upstream_b: int,
    refused_port: int,
) -> Iterator[Gateway]:
    a, b, dead = (f"127.0.0.1:{port}" for port in (upstream_a, upstream_b, refused_port))
    static = {"status": 503, "headers": {"content-type": "application/json"}, "body": FALLBACK_BODY}
    routes: list[tuple[str, str, dict[str, Any]]] = [
        ("echo", "a", {}),
        ("retry", "a", {"retry": {"attempts": 3, "on": ["reset", "503"]}}),
        ("down", "dead", {}),
        ("limited", "a", {"rate_limit": {"rps": 1, "burst": 1, "key": "route"}}),
        ("fb", "dead", {"fallback": {"response": static}}),
        ("brk", "breaking", {}),
        ("outl", "outlier", {}),
    ]
    config = {
        "service": "traced",
        "routes": [
            {
                "name": name,
                "match": {"path_prefix": f"/{name}/"},
                "cluster": cluster,
                "rewrite": {"prefix": "/"},
                **extra,
            }
            for name, cluster, extra in routes
        ],
        "clusters": [
            {"name": "a", "endpoints": [a], "circuit_breaker": NO_BREAKER},
            {"name": "dead", "endpoints": [dead], "circuit_breaker": NO_BREAKER},
            {
                "name": "breaking",
                "endpoints": [dead],
                "circuit_breaker": {"consecutive_failures": 2, "open_for": "30s"},
            },
            {
                "name": "outlier",
                "endpoints": [a, b],
                "lb": "round_robin",
                "circuit_breaker": NO_BREAKER,
                "outlier_detection": {"consecutive_5xx": 2, "base_ejection_time": "30s", "max_ejection_percent": 50},
            },
        ],
        "telemetry": tracing(receiver.endpoint),
    }
    with gateway(tmp_path_factory.mktemp("tracing"), config) as running:
        yield running


# --- spans -------------------------------------------------------------------------------------------------------


def test_server_and_client_spans(gw: Gateway, receiver: OtlpHttpReceiver, upstream_a: int) -> None:
    reply = fetch(gw, "/echo/items//1?x=1")
    assert reply.status == 200, reply.body
    sent = parse_traceparent(reply.upstream_headers()["traceparent"])
    assert sent["flags"] == "01"

    server = server_span(receiver, reply.request_id)
    [client] = client_spans(receiver, server, 1)
    assert server.trace_id == client.trace_id == sent["trace_id"]
    assert HEX32.fullmatch(server.trace_id)
    assert HEX16.fullmatch(server.span_id)
    assert server.parent_span_id == ""  # a new trace: the client sent no context
    assert client.parent_span_id == server.span_id
    assert sent["parent_id"] == client.span_id  # the upstream's parent is the attempt, not the server span

    assert (server.name, server.kind, server.status_code) == ("GET echo", "SERVER", "UNSET")
    attributes = server.attributes
    assert attributes["http.request.method"] == "GET"
    assert attributes["url.path"] == "/echo/items/1"  # normalized, no query
    assert attributes["url.scheme"] == "http"
    assert attributes["http.route"] == "echo"
    assert attributes["http.response.status_code"] == 200
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["server.port"] == gw.listen
    assert attributes["client.address"] == "127.0.0.1"
    assert attributes["user_agent.original"] == USER_AGENT
    assert attributes["network.protocol.version"] == "1.1"
    assert attributes["meshgate.route"] == "echo"
    assert attributes["meshgate.upstream"] == "a"
    assert attributes["meshgate.request_id"] == reply.request_id == reply.headers["x-request-id"]
    assert "error.type" not in attributes
    assert not any("x=1" in str(value) for value in attributes.values())  # no query string on the server span

    assert (client.name, client.kind) == ("GET", "CLIENT")
    assert client.status_code != "ERROR"
    assert client.attributes["http.request.method"] == "GET"
    assert client.attributes["server.address"] == "127.0.0.1"
    assert client.attributes["server.port"] == upstream_a
    assert client.attributes["url.full"].split("?")[0] == f"http://127.0.0.1:{upstream_a}/items/1"  # rewritten
    assert client.attributes["http.response.status_code"] == 200
    assert client.attributes["meshgate.upstream"] == "a"
    assert "http.request.resend_count" not in client.attributes  # the first attempt is not a resend
    assert "error.type" not in client.attributes

    for span in (server, client):
        assert span.resource["service.name"] == "traced"
        assert span.scope == "meshgate"
        assert abs(span.start_ns - time.time_ns()) < 60 * 10**9  # wall-clock times, not monotonic ones
    assert server.start_ns <= client.start_ns <= client.end_ns <= server.end_ns


def test_client_trace_context_is_continued_to_the_upstream(gw: Gateway, receiver: OtlpHttpReceiver) -> None:
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    reply = fetch(
        gw,
        "/echo/continued",
        {
            "traceparent": f"00-{trace_id}-{parent_id}-01",
            "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
            "baggage": "tenant=acme,tier=gold",
        },
    )
    assert reply.status == 200, reply.body
    upstream = reply.upstream_headers()
    sent = parse_traceparent(upstream["traceparent"])

    server = server_span(receiver, reply.request_id)
    [client] = client_spans(receiver, server, 1)
    assert server.trace_id == client.trace_id == sent["trace_id"] == trace_id
    assert server.parent_span_id == parent_id  # the client's span is the server span's parent
    assert sent["parent_id"] == client.span_id != parent_id
    assert sent["flags"] == "01"
    assert upstream["tracestate"].replace(" ", "") == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    baggage = dict(item.strip().split("=", 1) for item in upstream["baggage"].split(","))
    assert baggage == {"tenant": "acme", "tier": "gold"}


def test_an_invalid_traceparent_starts_a_new_trace_without_the_clients_tracestate(
    gw: Gateway, receiver: OtlpHttpReceiver
) -> None:
    reply = fetch(gw, "/echo/invalid-parent", {"traceparent": "00-not-a-trace-01", "tracestate": "rojo=1"})
    assert reply.status == 200, reply.body
    upstream = reply.upstream_headers()
    sent = parse_traceparent(upstream["traceparent"])
    server = server_span(receiver, reply.request_id)
    assert server.parent_span_id == ""  # a root span: the invalid header was ignored (W3C)
    assert sent["trace_id"] == server.trace_id
    assert "tracestate" not in upstream  # it belonged to the discarded context


def test_an_unsampled_client_trace_is_propagated_but_not_recorded(gw: Gateway, receiver: OtlpHttpReceiver) -> None:
    # Parent-based sampling: the client decided "not sampled" (flags 00), so the gateway records nothing of it,
    # yet the upstream still gets the trace (same id, flags 00) so its own logs can be correlated.
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    reply = fetch(gw, "/echo/unsampled", {"traceparent": f"00-{trace_id}-{parent_id}-00"})
    assert reply.status == 200, reply.body
    sent = parse_traceparent(reply.upstream_headers()["traceparent"])
    assert (sent["trace_id"], sent["flags"]) == (trace_id, "00")
    # A later, sampled request is exported; by then the unsampled one would have been too.
    later = fetch(gw, "/echo/after-unsampled")
    server_span(receiver, later.request_id)
    time.sleep(0.3)
    assert receiver.trace(trace_id) == []


def test_retries_are_client_spans_and_retry_events(gw: Gateway, receiver: OtlpHttpReceiver) -> None:
    key = uuid.uuid4().hex
    reply = fetch(gw, f"/retry/flaky/2/{key}?retry_after=")  # two 503s, then 200
    assert reply.status == 200, reply.body

    server = server_span(receiver, reply.request_id)
    attempts = client_spans(receiver, server, 3)
    assert len(attempts) == 3
    assert [span.attributes.get("http.request.resend_count") for span in attempts] == [None, 1, 2]
    assert [span.attributes.get("http.response.status_code") for span in attempts] == [503, 503, 200]
    assert [span.attributes.get("error.type") for span in attempts] == ["503", "503", None]
    for span in attempts:
        assert span.name == "GET"
        assert span.attributes["meshgate.upstream"] == "a"
    for earlier, later in itertools.pairwise(attempts):
        assert earlier.end_ns <= later.start_ns  # attempts are sequential

    retries = server.event("retry")
    assert [event["http.request.resend_count"] for event in retries] == [1, 2]
    assert all("503" in str(event["meshgate.retry.reason"]) for event in retries), retries
    assert server.attributes["http.response.status_code"] == 200
    assert server.status_code == "UNSET"
    assert "error.type" not in server.attributes


def test_a_reset_attempt_is_a_failed_client_span(gw: Gateway, receiver: OtlpHttpReceiver) -> None:
    key = uuid.uuid4().hex
    reply = fetch(gw, f"/retry/flaky/1/{key}?fail=reset")
    assert reply.status == 200, reply.body
    server = server_span(receiver, reply.request_id)
    first, second = client_spans(receiver, server, 2)
    assert first.attributes["error.type"] == "reset"
    assert "http.response.status_code" not in first.attributes  # no answer came
    assert second.attributes["http.request.resend_count"] == 1
    assert second.attributes["http.response.status_code"] == 200
    assert [event["http.request.resend_count"] for event in server.event("retry")] == [1]


def test_an_upstream_5xx_marks_both_spans(gw: Gateway, receiver: OtlpHttpReceiver) -> None:
    reply = fetch(gw, "/echo/status/500")
    assert reply.status == 500
    server = server_span(receiver, reply.request_id)
    [client] = client_spans(receiver, server, 1)
    assert server.status_code == "ERROR"
    assert server.attributes["http.response.status_code"] == 500
    assert server.attributes["error.type"] == "500"
    assert client.attributes["http.response.status_code"] == 500
    assert client.attributes["error.type"] == "500"


def test_route_not_found_carries_the_trace_id(gw: Gateway, receiver: OtlpHttpReceiver) -> None:
    not_found = fetch(gw, "/nowhere")
    assert not_found.status == 404
    assert not_found.json()["error"] == "route_not_found"
    server = server_span(receiver, not_found.request_id)
    assert not_found.json()["trace_id"] == server.trace_id
    assert server.name == "GET"  # no route matched
    assert server.attributes["http.response.status_code"] == 404
    # The convention sets error.type only for errors, and a 4xx is not one on a SERVER span: the code is in
    # meshgate.reason instead.
    assert "error.type" not in server.attributes
    assert server.attributes["meshgate.reason"] == "route_not_found"
    assert server.status_code == "UNSET"  # a 4xx is the client's problem, not the server span's error
    assert server.attributes["url.path"] == "/nowhere"


def test_an_upstream_failure_is_a_local_reply_with_the_trace_id(gw: Gateway, receiver: OtlpHttpReceiver) -> None:
    unavailable = fetch(gw, "/down/x")
    assert unavailable.status == 502
    assert unavailable.json()["error"] == "upstream_unavailable"
    server = server_span(receiver, unavailable.request_id)
    [client] = client_spans(receiver, server, 1)
    assert unavailable.json()["trace_id"] == server.trace_id
    assert (server.name, server.status_code) == ("GET down", "ERROR")
    assert server.attributes["http.response.status_code"] == 502
    assert server.attributes["error.type"] == "upstream_unavailable"
    assert server.attributes["meshgate.upstream"] == "dead"
    assert client.attributes["error.type"] in ("connect-failure", "refused"), client.attributes
    assert "http.response.status_code" not in client.attributes


def test_rate_limit_rejection_is_a_span_event(gw: Gateway, receiver: OtlpHttpReceiver) -> None:
    replies = [fetch(gw, "/limited/x") for _ in range(4)]  # 1 rps, burst 1: at most two of these pass
    rejected = [reply for reply in replies if reply.status == 429]
    assert rejected, [reply.status for reply in replies]
    reply = rejected[0]
    server = server_span(receiver, reply.request_id)
    assert reply.json()["trace_id"] == server.trace_id
    assert server.name == "GET limited"
    assert server.event("ratelimit.rejected"), server.events
    assert "error.type" not in server.attributes  # a 429 is the client's, not a server error
    assert server.attributes["meshgate.reason"] == "rate_limited"
    assert server.attributes["http.response.status_code"] == 429
    assert server.status_code == "UNSET"
    assert receiver.trace(server.trace_id) == [server]  # nothing went upstream


def test_fallback_is_a_span_event(gw: Gateway, receiver: OtlpHttpReceiver) -> None:
    reply = fetch(gw, "/fb/x")
    assert reply.status == 503
    assert reply.body.decode() == FALLBACK_BODY
    server = server_span(receiver, reply.request_id)
    [client] = client_spans(receiver, server, 1)
    assert server.event("fallback"), server.events
    assert server.name == "GET fb"
    assert "error.type" in client.attributes


def test_breaker_trip_is_a_client_span_event(gw: Gateway, receiver: OtlpHttpReceiver) -> None:
    replies = [fetch(gw, "/brk/x") for _ in range(3)]  # two refused attempts trip the breaker
    assert [reply.status for reply in replies[:2]] == [502, 502], [reply.status for reply in replies]
    assert replies[2].status == 503  # no usable endpoint left
    servers = [server_span(receiver, reply.request_id) for reply in replies[:2]]
    attempts = [span for server in servers for span in client_spans(receiver, server, 1)]
    tripped = [span for span in attempts if span.event("breaker.tripped")]
    assert tripped, [span.events for span in attempts]
    assert tripped[0].parent_span_id == servers[1].span_id  # the second failure in a row trips it


def test_outlier_ejection_is_a_client_span_event(gw: Gateway, receiver: OtlpHttpReceiver, upstream_b: int) -> None:
    key = uuid.uuid4().hex
    replies = [fetch(gw, f"/outl/flaky/1000/{key}?only=b&retry_after=") for _ in range(6)]  # b always fails
    failed = [reply for reply in replies if reply.status == 503]
    assert len(failed) >= 2, [reply.status for reply in replies]
    attempts = [span for reply in failed for span in client_spans(receiver, server_span(receiver, reply.request_id), 1)]
    ejected = [event for span in attempts for event in span.event("outlier.ejected")]
    assert ejected, [span.events for span in attempts]
    assert ejected[0]["meshgate.endpoint"] == f"127.0.0.1:{upstream_b}"
    assert replies[-1].status == 200  # b is out of rotation


# --- logs and metrics --------------------------------------------------------------------------------------------


def test_access_log_carries_the_server_span_ids(gw: Gateway, receiver: OtlpHttpReceiver) -> None:
    for reply in (fetch(gw, "/echo/logged"), fetch(gw, "/not-routed")):
        server = server_span(receiver, reply.request_id)
        lines = log_lines(gw, reply.request_id)
        [access] = [line for line in lines if line["event"] == "request"]
        assert (access["trace_id"], access["span_id"]) == (server.trace_id, server.span_id)
        for line in lines:  # every line inside the request, not only the access line
            assert (line.get("trace_id"), line.get("span_id")) == (server.trace_id, server.span_id), line


def test_latency_exemplars_are_sampled_trace_ids(gw: Gateway, receiver: OtlpHttpReceiver) -> None:

    replies = [fetch(gw, f"/echo/exemplar/{i}") for i in range(3)]
    newest = {server_span(receiver, reply.request_id).trace_id for reply in replies}
    connection = http.client.HTTPConnection("127.0.0.1", gw.admin, timeout=10)
    try:
        connection.request("GET", "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        response = connection.getresponse()
        text = response.read().decode()
        content_type = response.getheader("Content-Type", "")
    finally:
        connection.close()
    assert content_type.startswith("application/openmetrics-text"), content_type
    exemplars = [
        sample.exemplar
        for family in text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
        for sample in family.samples
        if sample.name == "http_server_request_duration_seconds_bucket"
        and sample.labels.get("http_route") == "echo"
        and sample.exemplar is not None
    ]
    assert exemplars, "no exemplars on http_server_request_duration_seconds for the echo route"
    known = {span.trace_id: span.span_id for span in receiver.spans if span.kind == "SERVER"}
    for exemplar in exemplars:
        assert HEX32.fullmatch(exemplar.labels["trace_id"]), exemplar
        assert known.get(exemplar.labels["trace_id"]) == exemplar.labels["span_id"], exemplar
    # The newest echo request is the exemplar of its bucket unless a later one landed there too.
    assert {exemplar.labels["trace_id"] for exemplar in exemplars} & newest


def test_exemplars_can_be_turned_off(tmp_path: Path, upstream_a: int, receiver: OtlpHttpReceiver) -> None:
    telemetry = {**tracing(receiver.endpoint), "metrics": {"exemplars": False}}
    with gateway(tmp_path, simple_config("no-exemplars", upstream_a, telemetry)) as gw:
        reply = fetch(gw, "/echo/plain")
        server_span(receiver, reply.request_id)  # sampled and exported, yet no exemplar
        request = urllib.request.Request(
            f"{gw.admin_url}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            text = response.read().decode()
    samples = [
        sample
        for family in text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
        for sample in family.samples
        if sample.name.startswith(("http_server_request_duration_seconds", "http_client_request_duration_seconds"))
    ]
    assert samples
    assert all(sample.exemplar is None for sample in samples)


# --- sampling ----------------------------------------------------------------------------------------------------


def test_sample_ratio_zero_exports_nothing_but_propagates(tmp_path: Path, upstream_a: int) -> None:
    with OtlpHttpReceiver() as receiver:
        config = simple_config("unsampled", upstream_a, tracing(receiver.endpoint, sample_ratio=0.0))
        with gateway(tmp_path, config) as gw:
            replies = [fetch(gw, f"/echo/{i}") for i in range(5)]
            not_found = fetch(gw, "/nowhere")
            trace_ids = set()
            for reply in replies:
                assert reply.status == 200, reply.body
                sent = parse_traceparent(reply.upstream_headers()["traceparent"])
                assert sent["flags"] == "00"
                trace_ids.add(sent["trace_id"])
                [access] = [line for line in log_lines(gw, reply.request_id) if line["event"] == "request"]
                assert access["trace_id"] == sent["trace_id"]
            assert len(trace_ids) == 5  # still a new trace per request
            assert HEX32.fullmatch(not_found.json()["trace_id"])

            # A sampled parent is followed whatever the ratio for new traces.
            trace_id = uuid.uuid4().hex
            followed = fetch(gw, "/echo/followed", {"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"})
            assert parse_traceparent(followed.upstream_headers()["traceparent"])["flags"] == "01"
            receiver.wait_for(lambda span: span.trace_id == trace_id, count=2)
            time.sleep(0.3)
        assert {span.trace_id for span in receiver.spans} == {trace_id}


async def test_max_traces_per_second_caps_new_traces(tmp_path: Path, upstream_a: int) -> None:
    cap = 5
    with OtlpHttpReceiver() as receiver:
        config = simple_config("capped", upstream_a, tracing(receiver.endpoint, max_traces_per_second=cap))
        with gateway(tmp_path, config) as gw:
            flags: list[str] = []
            semaphore = asyncio.Semaphore(10)

            async def one(session: aiohttp.ClientSession, i: int) -> None:
                async with semaphore, session.get(f"{gw.url}/echo/capped/{i}") as response:
                    assert response.status == 200
                    flags.append(parse_traceparent((await response.json())["headers"]["traceparent"])["flags"])

            started = time.monotonic()
            async with aiohttp.ClientSession() as session:
                await asyncio.gather(*(one(session, i) for i in range(100)))
            elapsed = time.monotonic() - started
            await asyncio.sleep(0.5)  # the last batch
            sampled = {span.trace_id for span in receiver.spans if span.kind == "SERVER"}
        allowed = cap * (elapsed + 1) + cap  # a bucket of one second's worth, refilled at `cap` per second
        assert 1 <= len(sampled) <= allowed, (len(sampled), elapsed)
        assert flags.count("01") == len(sampled)  # what the upstream was told matches what was recorded
        assert flags.count("00") == 100 - len(sampled)


# --- export protocols and propagators ----------------------------------------------------------------------------


def test_grpc_export(tmp_path: Path, upstream_a: int) -> None:
    with OtlpGrpcReceiver() as receiver:
        config = simple_config("grpc-traced", upstream_a, tracing(receiver.endpoint, protocol="grpc"))
        with gateway(tmp_path, config) as gw:
            reply = fetch(gw, "/echo/grpc")
            assert reply.status == 200
            server = server_span(receiver, reply.request_id)
            [client] = client_spans(receiver, server, 1)
    assert server.name == "GET echo"
    assert server.resource["service.name"] == "grpc-traced"
    assert parse_traceparent(reply.upstream_headers()["traceparent"])["parent_id"] == client.span_id


def test_b3_single_header(tmp_path: Path, upstream_a: int) -> None:
    with OtlpHttpReceiver() as receiver:
        telemetry = tracing(receiver.endpoint, propagators=["tracecontext", "baggage", "b3"])
        with gateway(tmp_path, simple_config("b3", upstream_a, telemetry)) as gw:
            trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
            reply = fetch(gw, "/echo/b3", {"b3": f"{trace_id}-{parent_id}-1"})
            assert reply.status == 200
            server = server_span(receiver, reply.request_id)
            [client] = client_spans(receiver, server, 1)
    assert (server.trace_id, server.parent_span_id) == (trace_id, parent_id)
    upstream = reply.upstream_headers()
    assert upstream["b3"].split("-")[:3] == [trace_id, client.span_id, "1"]
    assert parse_traceparent(upstream["traceparent"])["trace_id"] == trace_id  # W3C always travels too
    assert "x-b3-traceid" not in upstream  # single-header B3 only


def test_b3_multi_headers(tmp_path: Path, upstream_a: int) -> None:
    with OtlpHttpReceiver() as receiver:
        telemetry = tracing(receiver.endpoint, propagators=["tracecontext", "b3multi"])
        with gateway(tmp_path, simple_config("b3multi", upstream_a, telemetry)) as gw:
            trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
            reply = fetch(
                gw, "/echo/b3multi", {"X-B3-TraceId": trace_id, "X-B3-SpanId": parent_id, "X-B3-Sampled": "1"}
            )
            assert reply.status == 200
            server = server_span(receiver, reply.request_id)
            [client] = client_spans(receiver, server, 1)
    assert (server.trace_id, server.parent_span_id) == (trace_id, parent_id)
    upstream = reply.upstream_headers()
    assert upstream["x-b3-traceid"] == trace_id
    assert upstream["x-b3-spanid"] == client.span_id
    assert upstream["x-b3-sampled"] == "1"
    assert parse_traceparent(upstream["traceparent"])["parent_id"] == client.span_id
    assert "b3" not in upstream


# --- a collector that is down ------------------------------------------------------------------------------------


def scrape(gw: Gateway) -> str:
    with urllib.request.urlopen(f"{gw.admin_url}/metrics", timeout=5) as response:
        return str(response.read().decode())


@pytest.fixture
def hung_port() -> Iterator[int]:
    """A listener that completes TCP handshakes (the kernel does) but never reads or answers: a hung collector."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        yield int(listener.getsockname()[1])


@pytest.mark.parametrize("collector", ["refused", "hung"])
async def test_a_collector_that_is_down_never_slows_requests(
    tmp_path: Path, upstream_a: int, refused_port: int, hung_port: int, collector: str
) -> None:
    port = refused_port if collector == "refused" else hung_port
    # A 1 s export timeout: the exporter retries a refused connection with backoff until it passes.
    batch = {**BATCH, "export_timeout": "1s"}
    config = simple_config("no-collector", upstream_a, tracing(f"http://127.0.0.1:{port}", batch=batch))
    with gateway(tmp_path, config) as gw:
        semaphore = asyncio.Semaphore(20)
        latencies: list[float] = []
        statuses: list[int] = []

        async def one(session: aiohttp.ClientSession, i: int) -> None:
            async with semaphore:
                started = time.monotonic()
                async with session.get(f"{gw.url}/echo/down/{i}") as response:
                    await response.read()
                    statuses.append(response.status)
                latencies.append(time.monotonic() - started)

        started = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for _ in range(2):  # two rounds: the second runs while the first batches are being exported
                await asyncio.gather(*(one(session, i) for i in range(100)))
                await asyncio.sleep(0.3)
        elapsed = time.monotonic() - started
        assert statuses == [200] * 200
        assert elapsed < 8, elapsed
        assert max(latencies) < 1.0, sorted(latencies)[-5:]
        if collector == "refused":  # a refused export fails fast: counted as failed, never as exported
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                page = scrape(gw)
                if metric_sum(page, "meshgate_tracing_spans_total", result="failed") >= 400:
                    break
                await asyncio.sleep(0.2)
            assert metric_sum(page, "meshgate_tracing_spans_total", result="failed") == 400  # 200 SERVER + 200 CLIENT
            assert metric_sum(page, "meshgate_tracing_spans_total", result="exported") == 0

        stopping = time.monotonic()
        returncode = await asyncio.to_thread(stop, gw.process, 30)  # SIGTERM: drains, flushes what it can, exits
        assert returncode == 0
        # Nothing is in flight, so the drain is immediate; the queued spans get a short, bounded flush (the gateway
        # gives it 2 s), never the exporter's own timeouts and retries: a dead collector must not hold the exit.
        assert time.monotonic() - stopping < 5
