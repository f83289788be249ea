"""Valid configs compile to exactly the expected ``Snapshot``."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from gateway.config.compile import compile_document, compile_text
from gateway.config.snapshot import (
    Address,
    CircuitBreaker,
    Cluster,
    DnsDiscovery,
    EndpointSpec,
    HashOn,
    HeaderMatch,
    Limits,
    LogSettings,
    Rewrite,
    Route,
    RouteMatch,
    Snapshot,
    WeightedCluster,
)
from telemetry.settings import MetricSettings, TracingSettings

from .sample import BASE, DELETE, edited

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "gateway.yaml"


def sha256_of(document: object) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_minimal_config_gets_every_default() -> None:
    assert compile_document(BASE) == Snapshot(
        service="orders",
        listen=Address("127.0.0.1", 8080),
        admin=Address("127.0.0.1", 9901),
        routes=(Route("r", RouteMatch(), (WeightedCluster("orders", 1),), (1,), auth="none"),),
        clusters={"orders": Cluster("orders", (EndpointSpec(Address("127.0.0.1", 9001)),))},
        limits=Limits(),
        logs=LogSettings(),
        hash=sha256_of(BASE),
        document=BASE,
    )


FULL = """
service: orders.v2
listen: "[::]:8443"
admin: 0.0.0.0:9000
routes:
  - name: health
    match: {path: /healthz}
    cluster: orders
    auth: none
  - name: orders-read
    match:
      path_prefix: /orders
      methods: [get, HEAD]
      host: API.Example.com
      headers:
        - {name: X-Tenant, exact: acme}
        - {name: X-Version, prefix: v2}
        - {name: X-Trace, regex: "[0-9a-f]{32}"}
        - {name: X-Debug, present: true}
    cluster: orders
    timeout: 2500ms
  - name: orders-write
    match: {path_regex: "/orders/[0-9]+", methods: [POST]}
    split: [{cluster: orders, weight: 90}, {cluster: orders-canary, weight: 10}, {cluster: dns, weight: 0}]
    rewrite: {host: "orders.internal:8080"}
  - name: legacy
    match: {path_prefix: /v1/orders, host: "*.example.com"}
    cluster: dns
    rewrite: {prefix: /orders}
clusters:
  - name: orders
    endpoints: ["127.0.0.1:9001", {address: "[::1]:9002", weight: 3}]
    lb: weighted_round_robin
    connect_timeout: 250ms
    max_connections: 10
  - name: orders-canary
    endpoints: [localhost:9003]
    lb: ring_hash
    hash_on: header:X-User
  - name: dns
    discovery: {dns: "orders.svc:8080", refresh: 1m}
    lb: ring_hash
    hash_on: cookie:Session
limits:
  max_request_line: 4KiB
  max_header_size: 16384
  max_headers: 50
  max_body_size: 10MiB
  drain_timeout: 0s
  escaped_slashes: reject
telemetry:
  logs: {level: debug, access_log: false}
"""


def test_full_config() -> None:
    snapshot = compile_text(FULL)
    assert snapshot.service == "orders.v2"
    assert snapshot.listen == Address("::", 8443)
    assert snapshot.admin == Address("0.0.0.0", 9000)
    assert snapshot.routes == (
        Route("health", RouteMatch(path="/healthz"), (WeightedCluster("orders", 1),), (1,), auth="none"),
        Route(
            "orders-read",
            RouteMatch(
                path_prefix="/orders",
                methods=frozenset({"GET", "HEAD"}),
                host="api.example.com",
                headers=(
                    HeaderMatch("x-tenant", "exact", "acme"),
                    HeaderMatch("x-version", "prefix", "v2"),
                    HeaderMatch("x-trace", "regex", "[0-9a-f]{32}", re.compile("[0-9a-f]{32}")),
                    HeaderMatch("x-debug", "present"),
                ),
            ),
            (WeightedCluster("orders", 1),),
            (1,),
            timeout=2.5,
            auth="none",
        ),
        Route(
            "orders-write",
            RouteMatch(path_regex=re.compile("/orders/[0-9]+"), methods=frozenset({"POST"})),
            (WeightedCluster("orders", 90), WeightedCluster("orders-canary", 10), WeightedCluster("dns", 0)),
            (90, 100, 100),
            rewrite=Rewrite(host="orders.internal:8080"),
            auth="none",
        ),
        Route(
            "legacy",
            RouteMatch(path_prefix="/v1/orders", host="*.example.com"),
            (WeightedCluster("dns", 1),),
            (1,),
            rewrite=Rewrite(prefix="/orders"),
            auth="none",
        ),
    )
    assert snapshot.routes[2].total_weight == 100
    assert list(snapshot.clusters) == ["orders", "orders-canary", "dns"]
    assert snapshot.clusters["orders"] == Cluster(
        "orders",
        (EndpointSpec(Address("127.0.0.1", 9001)), EndpointSpec(Address("::1", 9002), 3)),
        lb="weighted_round_robin",
        connect_timeout=0.25,
        max_connections=10,
    )
    assert snapshot.clusters["orders-canary"] == Cluster(
        "orders-canary", (EndpointSpec(Address("localhost", 9003)),), lb="ring_hash", hash_on=HashOn("header", "x-user")
    )
    assert snapshot.clusters["dns"] == Cluster(
        "dns", dns=DnsDiscovery("orders.svc", 8080, 60.0), lb="ring_hash", hash_on=HashOn("cookie", "Session")
    )
    assert snapshot.limits == Limits(4096, 16384, 50, 10 * 1024 * 1024, 0.0, "reject")
    assert snapshot.logs == LogSettings("debug", access_log=False)


def test_regexes_are_compiled_for_full_match_use() -> None:
    route = compile_text(FULL).routes[2]
    assert route.match.path_regex is not None
    assert route.match.path_regex.fullmatch("/orders/12")
    assert not route.match.path_regex.fullmatch("/orders/12/items")


@pytest.mark.parametrize(
    ("edits", "attribute", "expected"),
    [
        ({"routes[0].timeout": "1.5s"}, "timeout", 1.5),
        ({"routes[0].timeout": "1h"}, "timeout", 3600.0),
        ({"routes[0].auth": "none"}, "auth", "none"),
        ({"routes[0].match": {}}, "match", RouteMatch()),
        ({"routes[0].match": {"headers": []}}, "match", RouteMatch()),
        ({"routes[0].match": {"methods": ["get", "GET", "Get"]}}, "match", RouteMatch(methods=frozenset({"GET"}))),
        ({"routes[0].match": {"methods": ["PURGE"]}}, "match", RouteMatch(methods=frozenset({"PURGE"}))),
        ({"routes[0].match": {"host": "*.Example.COM"}}, "match", RouteMatch(host="*.example.com")),
        ({"routes[0].match": {"host": "*"}}, "match", RouteMatch(host="*")),
        ({"routes[0].match": {"path_prefix": "/."}}, "match", RouteMatch(path_prefix="/.")),
        ({"routes[0].match": {"path_prefix": "/a/"}}, "match", RouteMatch(path_prefix="/a/")),
        ({"routes[0].match": {"path": "/a/.well-known"}}, "match", RouteMatch(path="/a/.well-known")),
        ({"routes[0].match": {"path": "/"}}, "match", RouteMatch(path="/")),
        ({"routes[0].match": {"path": "/a", "host": "127.0.0.1"}}, "match", RouteMatch(path="/a", host="127.0.0.1")),
        (
            {"routes[0].cluster": DELETE, "routes[0].split": [{"cluster": "orders", "weight": 7}]},
            "cumulative_weights",
            (7,),
        ),
        (
            {"routes[0].match": {"path": "/a"}, "routes[0].rewrite": {"prefix": "/b", "host": "b"}},
            "rewrite",
            Rewrite("/b", "b"),
        ),
    ],
)
def test_route_field(edits: dict[str, object], attribute: str, expected: Any) -> None:
    assert getattr(compile_document(edited(edits)).routes[0], attribute) == expected


@pytest.mark.parametrize(
    ("edits", "attribute", "expected"),
    [
        ({"clusters[0].lb": "peak_ewma"}, "lb", "peak_ewma"),
        ({"clusters[0].lb": "ring_hash"}, "hash_on", HashOn("client")),
        ({"clusters[0].lb": "ring_hash", "clusters[0].hash_on": "client"}, "hash_on", HashOn("client")),
        ({"clusters[0].connect_timeout": "100ms"}, "connect_timeout", 0.1),
        (
            {"clusters[0].endpoints": DELETE, "clusters[0].discovery": {"dns": "orders:80"}},
            "dns",
            DnsDiscovery("orders", 80, 5.0),
        ),
        (
            {"clusters[0].endpoints": ["a:1", {"address": "a:2", "weight": 1000}]},
            "endpoints",
            (EndpointSpec(Address("a", 1)), EndpointSpec(Address("a", 2), 1000)),
        ),
    ],
)
def test_cluster_field(edits: dict[str, object], attribute: str, expected: Any) -> None:
    assert getattr(compile_document(edited(edits)).clusters["orders"], attribute) == expected


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        ({"limits": {}}, Limits()),
        ({"limits.max_body_size": None}, Limits()),
        ({"limits.max_body_size": 0}, Limits(max_body_size=0)),
        ({"limits.max_body_size": "1GiB"}, Limits(max_body_size=1024**3)),
        ({"limits.max_header_size": "10KB"}, Limits(max_header_size=10_000)),
        (
            {"limits.drain_timeout": "30s", "limits.escaped_slashes": "keep"},
            Limits(drain_timeout=30.0, escaped_slashes="keep"),
        ),
    ],
)
def test_limits(edits: dict[str, object], expected: Limits) -> None:
    assert compile_document(edited(edits)).limits == expected


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        ({"telemetry": {}}, LogSettings()),
        ({"telemetry.logs": {}}, LogSettings()),
        ({"telemetry.logs.level": "warning"}, LogSettings(level="warning")),
        ({"telemetry.logs.access_log": False}, LogSettings(access_log=False)),
    ],
)
def test_logs(edits: dict[str, object], expected: LogSettings) -> None:
    assert compile_document(edited(edits)).logs == expected


@pytest.mark.parametrize(
    ("tracing", "expected"),
    [
        # A base URL gets the OTLP/HTTP traces path, as OTEL_EXPORTER_OTLP_ENDPOINT does.
        ({"otlp_endpoint": "http://jaeger:4318"}, TracingSettings("http://jaeger:4318/v1/traces")),
        ({"otlp_endpoint": "http://jaeger:4318/"}, TracingSettings("http://jaeger:4318/v1/traces")),
        ({"otlp_endpoint": "https://c.example/v1/traces"}, TracingSettings("https://c.example/v1/traces")),
        (
            {"otlp_endpoint": "http://jaeger:4317", "protocol": "grpc"},
            TracingSettings("http://jaeger:4317", protocol="grpc"),
        ),
        (
            {
                "otlp_endpoint": "http://c:4318",
                "sample_ratio": 0.1,
                "max_traces_per_second": 50,
                "propagators": ["tracecontext", "b3multi"],
                "batch": {"max_queue": 100, "delay": "50ms", "export_timeout": "2s"},
            },
            TracingSettings(
                "http://c:4318/v1/traces",
                sample_ratio=0.1,
                max_traces_per_second=50.0,
                propagators=("tracecontext", "b3multi"),
                max_queue=100,
                batch_delay=0.05,
                export_timeout=2.0,
            ),
        ),
        ({"otlp_endpoint": "http://c:4318", "max_traces_per_second": None}, TracingSettings("http://c:4318/v1/traces")),
    ],
)
def test_tracing(tracing: dict[str, object], expected: TracingSettings) -> None:
    assert compile_document(edited({"telemetry.tracing": tracing})).tracing == expected


def test_tracing_and_metrics_defaults() -> None:
    snapshot = compile_document(edited({}))
    assert snapshot.tracing is None
    assert snapshot.metrics == MetricSettings(exemplars=True)
    assert compile_document(edited({"telemetry.metrics.exemplars": False})).metrics == MetricSettings(False)


@pytest.mark.parametrize(
    ("listen", "admin"),
    [
        ("0.0.0.0:80", "0.0.0.0:81"),  # same host, other port
        ("127.0.0.1:80", "127.0.0.2:80"),  # same port, other host
        ("0.0.0.0:80", "[::1]:80"),  # an IPv4 wildcard does not take the IPv6 port
    ],
)
def test_listen_and_admin_may_share_a_host_or_a_port(listen: str, admin: str) -> None:
    snapshot = compile_document(edited({"listen": listen, "admin": admin}))
    assert (str(snapshot.listen), str(snapshot.admin)) == (listen, admin)


def test_json_and_yaml_compile_to_the_same_snapshot() -> None:
    yaml_text = """
service: orders
routes:
  - {name: r, cluster: orders}
clusters:
  - name: orders
    endpoints: [127.0.0.1:9001]
"""
    assert compile_text(json.dumps(BASE, indent=2)) == compile_text(yaml_text) == compile_document(BASE)


def test_hash_follows_content_not_layout() -> None:
    reordered = {"clusters": BASE["clusters"], "routes": BASE["routes"], "service": "orders"}
    assert compile_document(reordered).hash == compile_document(BASE).hash == sha256_of(BASE)
    assert compile_document(edited({"routes[0].timeout": "1s"})).hash != compile_document(BASE).hash


def test_any_mapping_is_accepted() -> None:
    assert compile_document(MappingProxyType(edited({}))).hash == compile_document(BASE).hash


def test_document_is_a_copy_of_the_input() -> None:
    document = edited({})
    snapshot = compile_document(document)
    document["routes"][0]["name"] = "changed"
    assert snapshot.document["routes"][0]["name"] == "r"
    assert snapshot.routes[0].name == "r"


def test_yaml_merge_keys_share_settings() -> None:
    # Unknown keys are errors even as anchor holders, so the shared settings live on the first cluster.
    text = """
service: orders
routes: [{name: r, cluster: a}, {name: s, cluster: b}]
clusters:
  - &a {name: a, endpoints: ["h:1"], lb: least_request, connect_timeout: 2s}
  - {<<: *a, name: b, endpoints: ["h:2"]}
"""
    clusters = compile_text(text).clusters
    assert clusters["b"] == Cluster("b", (EndpointSpec(Address("h", 2)),), lb="least_request", connect_timeout=2.0)


def test_example_config_compiles() -> None:
    snapshot = compile_text(EXAMPLE.read_text(encoding="utf-8"))
    assert snapshot.service == "demo"
    assert (str(snapshot.listen), str(snapshot.admin)) == ("127.0.0.1:8080", "127.0.0.1:9901")
    demo = snapshot.clusters["demo"]
    assert demo.lb == "least_request"
    assert [str(endpoint.address) for endpoint in demo.endpoints] == ["127.0.0.1:9001", "127.0.0.1:9002"]
    assert [str(endpoint.address) for endpoint in snapshot.clusters["demo-canary"].endpoints] == ["127.0.0.1:9002"]
    routes = {route.name: route for route in snapshot.routes}
    assert routes["checkout"].split == (WeightedCluster("demo", 90), WeightedCluster("demo-canary", 10))
    matches = [route.match for route in snapshot.routes]
    assert any(match.path is not None for match in matches)
    assert any(match.path_prefix is not None for match in matches)
    assert any(match.path_regex is not None for match in matches)
    assert any(match.methods for match in matches)
    assert any(match.headers for match in matches)
    assert any(route.rewrite is not None and route.rewrite.prefix for route in snapshot.routes)
    # The resilience settings are shown too, on the demo cluster and its routes.
    assert routes["items-by-id"].retry.attempts > 1
    assert routes["items-by-id"].retry.statuses
    assert any(route.rate_limit is not None for route in snapshot.routes)
    assert not any(route.rate_limit is not None and route.rate_limit.shared for route in snapshot.routes)  # no Redis
    assert snapshot.rate_limit_service is None
    assert any(route.fallback is not None and route.fallback.response is not None for route in snapshot.routes)
    assert demo.circuit_breaker != CircuitBreaker()
    assert demo.outlier_detection is not None
    assert demo.health_check is not None
    assert demo.health_check.path == "/healthz"  # what examples/upstream.py answers
