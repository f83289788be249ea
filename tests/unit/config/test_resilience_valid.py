"""Valid resilience settings compile to exactly the expected snapshot types: retries, rate limits, fallbacks,
circuit breakers, outlier detection, health checks, retry budgets and the rate-limit service."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config.compile import compile_document, compile_text
from gateway.config.snapshot import (
    Address,
    CircuitBreaker,
    Cluster,
    EndpointSpec,
    Fallback,
    FallbackResponse,
    HealthCheck,
    OutlierDetection,
    RateLimit,
    RateLimitService,
    RetryBudget,
    RetryPolicy,
    Route,
    RouteMatch,
    WeightedCluster,
)

from .sample import BASE, edited

R = "routes[0]"
RT = "routes[0].retry"
RL = "routes[0].rate_limit"
FB = "routes[0].fallback"
CB = "clusters[0].circuit_breaker"
OD = "clusters[0].outlier_detection"
HC = "clusters[0].health_check"
BU = "clusters[0].retry_budget"
SERVICE = {"redis": "127.0.0.1:6379"}
SECOND = {"clusters[1]": {"name": "spare", "endpoints": ["127.0.0.1:9009"]}}

RICH = """
service: orders
routes:
  - name: read
    match: {path_prefix: /orders, methods: [GET, HEAD]}
    cluster: orders
    timeout: 2s
    retry:
      attempts: 3
      per_try_timeout: 500ms
      on: [connect-failure, reset, "502", 503, "504", timeout]
      backoff: {base: 10ms, max: 1s}
      non_idempotent: true
      max_replay_body: 1MiB
    rate_limit: {rps: 2.5, key: header:X-Api-Key, shared: true}
    fallback: {cluster: stale}
  - name: write
    match: {path_prefix: /orders}
    split: [{cluster: orders, weight: 9}, {cluster: canary, weight: 1}]
    rate_limit: {rps: 100, burst: 50, key: principal}
    fallback:
      response:
        status: 503
        headers: {Content-Type: application/json, Retry-After: "5"}
        body: '{"error": "orders_down"}'
clusters:
  - name: orders
    endpoints: [127.0.0.1:9001]
    circuit_breaker: {max_requests: 1000, max_pending: 100, consecutive_failures: 0, open_for: 5s, max_open_for: 1m}
    outlier_detection: {consecutive_5xx: 3, base_ejection_time: 10s, max_ejection_time: 2m, max_ejection_percent: 0}
    health_check:
      path: /healthz?deep=1
      interval: 2s
      timeout: 2s
      unhealthy_threshold: 1
      healthy_threshold: 4
      panic_threshold: 0
    retry_budget: {ratio: 0, min_per_second: 2.5, window: 1s}
  - name: canary
    endpoints: [127.0.0.1:9002]
    outlier_detection: {}
    health_check: {}
    retry_budget: {ratio: 1}
  - name: stale
    endpoints: [127.0.0.1:9003]
    circuit_breaker: {open_for: 10m}
    outlier_detection: {base_ejection_time: 10m}
    health_check: {interval: 500ms}
    retry_budget: {min_per_second: 0}
rate_limit_service: {redis: "[::1]:6380", timeout: 10ms, prefix: "meshgate:orders-v2_blue"}
"""


def test_rich_example_compiles_to_exactly_these_settings() -> None:
    snapshot = compile_text(RICH)
    assert snapshot.routes == (
        Route(
            "read",
            RouteMatch(path_prefix="/orders", methods=frozenset({"GET", "HEAD"})),
            (WeightedCluster("orders", 1),),
            (1,),
            timeout=2.0,
            auth="none",
            retry=RetryPolicy(
                attempts=3,
                per_try_timeout=0.5,
                on=frozenset({"connect-failure", "reset", "timeout"}),
                statuses=frozenset({502, 503, 504}),
                backoff_base=0.01,
                backoff_max=1.0,
                non_idempotent=True,
                max_replay_body=1024 * 1024,
            ),
            rate_limit=RateLimit(2.5, 3, "header", "x-api-key", shared=True),
            fallback=Fallback(cluster="stale"),
        ),
        Route(
            "write",
            RouteMatch(path_prefix="/orders"),
            (WeightedCluster("orders", 9), WeightedCluster("canary", 1)),
            (9, 10),
            auth="none",
            rate_limit=RateLimit(100.0, 50, "principal"),
            fallback=Fallback(
                response=FallbackResponse(
                    503,
                    (("Content-Type", "application/json"), ("Retry-After", "5")),
                    b'{"error": "orders_down"}',
                )
            ),
        ),
    )
    assert snapshot.clusters == {
        "orders": Cluster(
            "orders",
            (EndpointSpec(Address("127.0.0.1", 9001)),),
            circuit_breaker=CircuitBreaker(1000, 100, 0, 5.0, 60.0),
            outlier_detection=OutlierDetection(3, 10.0, 120.0, 0),
            health_check=HealthCheck("/healthz?deep=1", 2.0, 2.0, 1, 4, 0),
            retry_budget=RetryBudget(0.0, 2.5, 1.0),
        ),
        "canary": Cluster(
            "canary",
            (EndpointSpec(Address("127.0.0.1", 9002)),),
            outlier_detection=OutlierDetection(),
            health_check=HealthCheck(),
            retry_budget=RetryBudget(ratio=1.0),
        ),
        # A longer base/open_for/shorter interval moves the unset bound with it instead of making it an error.
        "stale": Cluster(
            "stale",
            (EndpointSpec(Address("127.0.0.1", 9003)),),
            circuit_breaker=CircuitBreaker(open_for=600.0, max_open_for=600.0),
            outlier_detection=OutlierDetection(base_ejection_time=600.0, max_ejection_time=600.0),
            health_check=HealthCheck(interval=0.5, timeout=0.5),
            retry_budget=RetryBudget(min_per_second=0.0),
        ),
    }
    assert snapshot.rate_limit_service == RateLimitService(Address("::1", 6380), 0.01, "meshgate:orders-v2_blue")


def test_absent_sections_get_the_documented_defaults() -> None:
    snapshot = compile_document(BASE)
    route, cluster = snapshot.routes[0], snapshot.clusters["orders"]
    assert route.retry == RetryPolicy(
        attempts=1, on=frozenset({"connect-failure", "refused", "reset"}), backoff_base=0.025, backoff_max=0.25
    )
    assert (route.rate_limit, route.fallback) == (None, None)
    assert cluster.circuit_breaker == CircuitBreaker(1024, 1024, 5, 10.0, 300.0)
    assert (cluster.outlier_detection, cluster.health_check) == (None, None)
    assert cluster.retry_budget == RetryBudget(0.2, 10.0, 10.0)
    assert snapshot.rate_limit_service is None


@pytest.mark.parametrize(
    ("retry", "expected"),
    [
        ({}, RetryPolicy()),
        ({"attempts": 10}, RetryPolicy(attempts=10)),
        ({"on": ["503"]}, RetryPolicy(on=frozenset(), statuses=frozenset({503}))),
        ({"on": [503, "503", 100, 599]}, RetryPolicy(on=frozenset(), statuses=frozenset({100, 503, 599}))),
        ({"on": ["refused", "refused"]}, RetryPolicy(on=frozenset({"refused"}))),
        ({"per_try_timeout": "1h"}, RetryPolicy(per_try_timeout=3600.0)),  # no route timeout: no upper bound
        ({"backoff": {}}, RetryPolicy()),
        ({"backoff": {"base": "100ms"}}, RetryPolicy(backoff_base=0.1, backoff_max=1.0)),  # max: 10x base
        ({"backoff": {"max": "25ms"}}, RetryPolicy(backoff_base=0.025, backoff_max=0.025)),
        ({"max_replay_body": 0}, RetryPolicy(max_replay_body=0)),
        ({"non_idempotent": False}, RetryPolicy()),
    ],
)
def test_retry(retry: dict[str, Any], expected: RetryPolicy) -> None:
    assert compile_document(edited({RT: retry})).routes[0].retry == expected


def test_per_try_timeout_may_equal_the_route_timeout() -> None:
    route = compile_document(edited({f"{R}.timeout": "1s", RT: {"per_try_timeout": "1000ms"}})).routes[0]
    assert route.retry.per_try_timeout == route.timeout == 1.0


@pytest.mark.parametrize(
    ("rate_limit", "expected"),
    [
        ({"rps": 100}, RateLimit(100.0, 100)),  # burst: one second's worth
        ({"rps": 0.1}, RateLimit(0.1, 1)),  # ... but at least one request
        ({"rps": 2.5}, RateLimit(2.5, 3)),
        ({"rps": 1, "burst": 1000}, RateLimit(1.0, 1000)),
        ({"rps": 1, "key": "client"}, RateLimit(1.0, 1, "client")),
        ({"rps": 1, "key": "route"}, RateLimit(1.0, 1, "route")),
        ({"rps": 1, "key": "principal"}, RateLimit(1.0, 1, "principal")),
        ({"rps": 1, "key": "header:X-Tenant"}, RateLimit(1.0, 1, "header", "x-tenant")),
        ({"rps": 1, "shared": False}, RateLimit(1.0, 1)),
    ],
)
def test_rate_limit(rate_limit: dict[str, Any], expected: RateLimit) -> None:
    assert compile_document(edited({RL: rate_limit})).routes[0].rate_limit == expected


def test_shared_rate_limit_with_service() -> None:
    snapshot = compile_document(edited({"rate_limit_service": SERVICE, RL: {"rps": 5, "shared": True}}))
    assert snapshot.routes[0].rate_limit == RateLimit(5.0, 5, shared=True)
    assert snapshot.rate_limit_service == RateLimitService(Address("127.0.0.1", 6379), 0.025, "meshgate")


def test_rate_limit_service_without_shared_limits_is_fine() -> None:
    assert compile_document(edited({"rate_limit_service": SERVICE})).rate_limit_service is not None


@pytest.mark.parametrize(
    ("fallback", "expected"),
    [
        ({"cluster": "spare"}, Fallback(cluster="spare")),
        ({"response": {"status": 503}}, Fallback(response=FallbackResponse(503))),
        ({"response": {"status": 200, "headers": {}, "body": ""}}, Fallback(response=FallbackResponse(200))),
        ({"response": {"status": 204, "body": ""}}, Fallback(response=FallbackResponse(204))),
        ({"response": {"status": 599, "body": "é\n"}}, Fallback(response=FallbackResponse(599, (), "é\n".encode()))),
        (
            {"response": {"status": 200, "headers": {"X-Cache": "fallback", "x-note": "a\tb é"}}},
            Fallback(response=FallbackResponse(200, (("X-Cache", "fallback"), ("x-note", "a\tb é")))),
        ),
    ],
)
def test_fallback(fallback: dict[str, Any], expected: Fallback) -> None:
    assert compile_document(edited({**SECOND, FB: fallback})).routes[0].fallback == expected


@pytest.mark.parametrize(
    ("edits", "attribute", "expected"),
    [
        ({CB: {}}, "circuit_breaker", CircuitBreaker()),
        ({CB: {"max_open_for": "10s"}}, "circuit_breaker", CircuitBreaker(max_open_for=10.0)),
        ({CB: {"consecutive_failures": 0}}, "circuit_breaker", CircuitBreaker(consecutive_failures=0)),
        ({OD: {"max_ejection_percent": 100}}, "outlier_detection", OutlierDetection(max_ejection_percent=100)),
        ({OD: {"max_ejection_time": "30s"}}, "outlier_detection", OutlierDetection(max_ejection_time=30.0)),
        ({HC: {"path": "/"}}, "health_check", HealthCheck(path="/")),
        ({HC: {"path": "/status?probe=%20x"}}, "health_check", HealthCheck(path="/status?probe=%20x")),
        ({HC: {"timeout": "5s"}}, "health_check", HealthCheck(timeout=5.0)),  # equal to the interval is fine
        ({HC: {"panic_threshold": 100}}, "health_check", HealthCheck(panic_threshold=100)),
        ({BU: {}}, "retry_budget", RetryBudget()),
        ({BU: {"ratio": 0.5, "min_per_second": 3}}, "retry_budget", RetryBudget(0.5, 3.0)),
        ({BU: {"window": "1m"}}, "retry_budget", RetryBudget(window=60.0)),
    ],
)
def test_cluster_settings(edits: dict[str, object], attribute: str, expected: Any) -> None:
    assert getattr(compile_document(edited(edits)).clusters["orders"], attribute) == expected
