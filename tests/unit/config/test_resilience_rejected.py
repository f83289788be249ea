"""Every rejected resilience setting, with the exact ``path: message`` lines the user sees (and no others): retries,
rate limits, fallbacks, circuit breakers, outlier detection, health checks, retry budgets, the rate-limit service.

Each case edits the minimal valid document of ``sample.py`` at the paths the messages name.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from gateway.config.compile import compile_document, compile_text
from gateway.config.errors import ConfigError

from .sample import DELETE, edited

DURATION = 'expected a duration string like "250ms" or "2s"'
RETRY_ON = '(one of connect-failure, refused, reset, timeout, or a status code like "503")'
RATE_KEY = "(use principal, client, route or header:<name>)"
CHECK_PATH = '(percent-encode spaces and non-ASCII characters; no "#")'
PREFIX = '(use letters, digits, ":", "_", "-")'
R = "routes[0]"
RT = "routes[0].retry"
RL = "routes[0].rate_limit"
FB = "routes[0].fallback"
RS = "routes[0].fallback.response"
C = "clusters[0]"
CB = "clusters[0].circuit_breaker"
OD = "clusters[0].outlier_detection"
HC = "clusters[0].health_check"
BU = "clusters[0].retry_budget"
SERVICE = {"redis": "127.0.0.1:6379"}
SECOND = {"clusters[1]": {"name": "spare", "endpoints": ["127.0.0.1:9009"]}}


def case(edits: Mapping[str, object], *lines: str) -> object:
    return pytest.param(edits, "\n".join(lines), id=lines[0])


RETRIES = [
    case({RT: []}, "routes[0].retry: expected a mapping, got a list"),
    case({RT: {"attemps": 3}}, 'routes[0].retry.attemps: unknown key (did you mean "attempts"?)'),
    case({RT: {"attempts": 0}}, "routes[0].retry.attempts: must be between 1 and 10"),
    case({RT: {"attempts": 11}}, "routes[0].retry.attempts: must be between 1 and 10"),
    case({RT: {"attempts": "3"}}, 'routes[0].retry.attempts: expected an integer, got "3"'),
    case({RT: {"attempts": True}}, "routes[0].retry.attempts: expected an integer, got true"),
    case({RT: {"per_try_timeout": "0ms"}}, "routes[0].retry.per_try_timeout: must be > 0"),
    case({RT: {"per_try_timeout": 1}}, f"routes[0].retry.per_try_timeout: {DURATION}, got 1"),
    case(
        {f"{R}.timeout": "2s", RT: {"per_try_timeout": "2001ms"}},
        "routes[0].retry.per_try_timeout: must be <= timeout (2s)",
    ),
    case(
        {f"{R}.timeout": "1500ms", RT: {"per_try_timeout": "1m"}},
        "routes[0].retry.per_try_timeout: must be <= timeout (1500ms)",
    ),
    case({RT: {"on": "reset"}}, 'routes[0].retry.on: expected a list, got "reset"'),
    case({RT: {"on": []}}, "routes[0].retry.on: must not be empty"),
    case({RT: {"on": ["reset", "refused", "x"]}}, f'routes[0].retry.on[2]: unknown retry condition "x" {RETRY_ON}'),
    case({RT: {"on": ["Reset"]}}, f'routes[0].retry.on[0]: unknown retry condition "Reset" {RETRY_ON}'),
    case({RT: {"on": ["5xx"]}}, f'routes[0].retry.on[0]: unknown retry condition "5xx" {RETRY_ON}'),
    case({RT: {"on": ["50"]}}, f'routes[0].retry.on[0]: unknown retry condition "50" {RETRY_ON}'),
    case({RT: {"on": [" 503"]}}, f'routes[0].retry.on[0]: unknown retry condition " 503" {RETRY_ON}'),
    case({RT: {"on": [600]}}, "routes[0].retry.on[0]: must be between 100 and 599"),
    case({RT: {"on": ["099"]}}, "routes[0].retry.on[0]: must be between 100 and 599"),
    case({RT: {"on": [True]}}, "routes[0].retry.on[0]: expected a retry condition or a status code, got true"),
    case({RT: {"on": [503.0]}}, "routes[0].retry.on[0]: expected a retry condition or a status code, got 503.0"),
    case({RT: {"on": [None]}}, "routes[0].retry.on[0]: expected a retry condition or a status code, got null"),
    case({RT: {"backoff": "25ms"}}, 'routes[0].retry.backoff: expected a mapping, got "25ms"'),
    case({RT: {"backoff": {"min": "1s"}}}, "routes[0].retry.backoff.min: unknown key"),
    case({RT: {"backoff": {"base": "0s"}}}, "routes[0].retry.backoff.base: must be > 0"),
    case({RT: {"backoff": {"max": "0s"}}}, "routes[0].retry.backoff.max: must be > 0"),
    case({RT: {"backoff": {"base": "100ms", "max": "50ms"}}}, "routes[0].retry.backoff.max: must be >= base (100ms)"),
    case({RT: {"backoff": {"max": "10ms"}}}, "routes[0].retry.backoff.max: must be >= base (25ms)"),
    case({RT: {"non_idempotent": "yes"}}, 'routes[0].retry.non_idempotent: expected true or false, got "yes"'),
    case({RT: {"max_replay_body": -1}}, "routes[0].retry.max_replay_body: must be >= 0"),
    case(
        {RT: {"max_replay_body": "64k"}},
        'routes[0].retry.max_replay_body: invalid size "64k" (use e.g. 8190, 512KiB, 10MiB, 1MB)',
    ),
]

RATE_LIMITS = [
    case({RL: 100}, "routes[0].rate_limit: expected a mapping, got 100"),
    case({RL: {}}, "routes[0].rate_limit.rps: required"),
    case({RL: {"burst": 5}}, "routes[0].rate_limit.rps: required"),
    case({RL: {"rps": 0}}, "routes[0].rate_limit.rps: must be > 0"),
    case({RL: {"rps": -0.5}}, "routes[0].rate_limit.rps: must be > 0"),
    case({RL: {"rps": "100"}}, 'routes[0].rate_limit.rps: expected a number, got "100"'),
    case({RL: {"rps": True}}, "routes[0].rate_limit.rps: expected a number, got true"),
    case({RL: {"rps": float("inf")}}, "routes[0].rate_limit.rps: must be a finite number"),
    case({RL: {"rps": float("nan")}}, "routes[0].rate_limit.rps: must be a finite number"),
    case({RL: {"rps": 1, "burst": 0}}, "routes[0].rate_limit.burst: must be >= 1"),
    case({RL: {"rps": 1, "burst": 1.5}}, "routes[0].rate_limit.burst: expected an integer, got 1.5"),
    case({RL: {"rps": 1, "key": "ip"}}, f'routes[0].rate_limit.key: invalid value "ip" {RATE_KEY}'),
    case({RL: {"rps": 1, "key": "Client"}}, f'routes[0].rate_limit.key: invalid value "Client" {RATE_KEY}'),
    case({RL: {"rps": 1, "key": "header:"}}, f'routes[0].rate_limit.key: invalid value "header:" {RATE_KEY}'),
    case({RL: {"rps": 1, "key": "header:a b"}}, f'routes[0].rate_limit.key: invalid value "header:a b" {RATE_KEY}'),
    case({RL: {"rps": 1, "key": "cookie:s"}}, f'routes[0].rate_limit.key: invalid value "cookie:s" {RATE_KEY}'),
    case({RL: {"rps": 1, "key": 5}}, "routes[0].rate_limit.key: expected a string, got 5"),
    case({RL: {"rps": 1, "shared": True}}, "routes[0].rate_limit.shared: needs rate_limit_service"),
    case({RL: {"rps": 1, "shared": "true"}}, 'routes[0].rate_limit.shared: expected true or false, got "true"'),
    case({RL: {"rps": 1, "per": "minute"}}, "routes[0].rate_limit.per: unknown key"),
    case(
        {RL: {"rps": 0, "burst": 0, "key": "ip", "shared": True}},
        "routes[0].rate_limit.rps: must be > 0",
        "routes[0].rate_limit.burst: must be >= 1",
        f'routes[0].rate_limit.key: invalid value "ip" {RATE_KEY}',
        "routes[0].rate_limit.shared: needs rate_limit_service",
    ),
]

FALLBACKS = [
    case({FB: "spare"}, 'routes[0].fallback: expected a mapping, got "spare"'),
    case({FB: {}}, "routes[0].fallback: needs one of cluster, response"),
    case(
        {**SECOND, FB: {"cluster": "spare", "response": {"status": 503}}},
        "routes[0].fallback: use only one of cluster, response",
    ),
    case({FB: {"cluster": "ordrs"}}, 'routes[0].fallback.cluster: unknown cluster "ordrs" (did you mean "orders"?)'),
    case({FB: {"cluster": "zzz"}}, 'routes[0].fallback.cluster: unknown cluster "zzz"'),
    case({FB: {"cluster": 5}}, "routes[0].fallback.cluster: expected a string, got 5"),
    case({FB: {"cluster": "orders"}}, "routes[0].fallback.cluster: must differ from the route's cluster"),
    case(
        {
            **SECOND,
            f"{R}.cluster": DELETE,
            f"{R}.split": [{"cluster": "orders", "weight": 1}, {"cluster": "spare", "weight": 0}],
            FB: {"cluster": "spare"},
        },
        "routes[0].fallback.cluster: must not be in the route's split",
    ),
    case({FB: {"response": 503}}, "routes[0].fallback.response: expected a mapping, got 503"),
    case({FB: {"response": {}}}, "routes[0].fallback.response.status: required"),
    case({FB: {"response": {"body": "x"}}}, "routes[0].fallback.response.status: required"),
    case({FB: {"response": {"status": 99}}}, "routes[0].fallback.response.status: must be between 200 and 599"),
    case({FB: {"response": {"status": 103}}}, "routes[0].fallback.response.status: must be between 200 and 599"),
    case({FB: {"response": {"status": 600}}}, "routes[0].fallback.response.status: must be between 200 and 599"),
    case({FB: {"response": {"status": "503"}}}, 'routes[0].fallback.response.status: expected an integer, got "503"'),
    case({FB: {"response": {"status": 200, "code": 1}}}, "routes[0].fallback.response.code: unknown key"),
    case({FB: {"response": {"status": 200, "body": 5}}}, "routes[0].fallback.response.body: expected a string, got 5"),
    case(
        {FB: {"response": {"status": 200, "body": {"error": "x"}}}},
        "routes[0].fallback.response.body: expected a string, got a mapping",
    ),
    case(
        {FB: {"response": {"status": 204, "body": "x"}}},
        "routes[0].fallback.response.body: must be empty (a 204 response has no body)",
    ),
    case(
        {FB: {"response": {"status": 304, "body": "x"}}},
        "routes[0].fallback.response.body: must be empty (a 304 response has no body)",
    ),
    case(
        {FB: {"response": {"status": 200, "headers": ["x-a: 1"]}}},
        "routes[0].fallback.response.headers: expected a mapping, got a list",
    ),
    case(
        {FB: {"response": {"status": 200, "headers": {"a:b": "x"}}}},
        f'{RS}.headers.a:b: invalid header name "a:b"',
    ),
    case({FB: {"response": {"status": 200, "headers": {5: "x"}}}}, f"{RS}.headers.5: expected a string, got 5"),
    case(
        {FB: {"response": {"status": 200, "headers": {"retry-after": 30}}}},
        f"{RS}.headers.retry-after: expected a string, got 30",
    ),
    case(
        {FB: {"response": {"status": 200, "headers": {"x-a": "a\r\nx-b: b"}}}},
        f'{RS}.headers.x-a: invalid header value "a\\r\\nx-b: b" (control characters are not allowed)',
    ),
    case(
        {FB: {"response": {"status": 200, "headers": {"X-A": "1", "x-a": "2"}}}},
        f'{RS}.headers.x-a: duplicate header "x-a" (first at {RS}.headers.X-A)',
    ),
    case(
        {FB: {"response": {"status": 200, "headers": {"Content-Length": "3"}}}},
        f"{RS}.headers.Content-Length: not allowed (the gateway sets it from the body)",
    ),
    case(
        {FB: {"response": {"status": 200, "headers": {"transfer-encoding": "chunked"}}}},
        f"{RS}.headers.transfer-encoding: not allowed (the gateway sets it from the body)",
    ),
]

BREAKERS = [
    case({CB: True}, "clusters[0].circuit_breaker: expected a mapping, got true"),
    case(
        {CB: {"max_request": 1}}, 'clusters[0].circuit_breaker.max_request: unknown key (did you mean "max_requests"?)'
    ),
    case({CB: {"max_requests": 0}}, "clusters[0].circuit_breaker.max_requests: must be >= 1"),
    case({CB: {"max_pending": 0}}, "clusters[0].circuit_breaker.max_pending: must be >= 1"),
    case({CB: {"max_pending": "100"}}, 'clusters[0].circuit_breaker.max_pending: expected an integer, got "100"'),
    case({CB: {"consecutive_failures": -1}}, "clusters[0].circuit_breaker.consecutive_failures: must be >= 0"),
    case({CB: {"open_for": "0s"}}, "clusters[0].circuit_breaker.open_for: must be > 0"),
    case({CB: {"open_for": 10}}, f"clusters[0].circuit_breaker.open_for: {DURATION}, got 10"),
    case({CB: {"max_open_for": "0s"}}, "clusters[0].circuit_breaker.max_open_for: must be > 0"),
    case({CB: {"max_open_for": "5s"}}, "clusters[0].circuit_breaker.max_open_for: must be >= open_for (10s)"),
    case(
        {CB: {"open_for": "2m", "max_open_for": "90s"}},
        "clusters[0].circuit_breaker.max_open_for: must be >= open_for (2m)",
    ),
]

OUTLIERS = [
    case({OD: []}, "clusters[0].outlier_detection: expected a mapping, got a list"),
    case({OD: {"consecutive_5xx": 0}}, "clusters[0].outlier_detection.consecutive_5xx: must be >= 1"),
    case(
        {OD: {"consecutive_errors": 5}},
        'clusters[0].outlier_detection.consecutive_errors: unknown key (did you mean "consecutive_5xx"?)',
    ),
    case({OD: {"base_ejection_time": "0s"}}, "clusters[0].outlier_detection.base_ejection_time: must be > 0"),
    case({OD: {"max_ejection_time": "0s"}}, "clusters[0].outlier_detection.max_ejection_time: must be > 0"),
    case(
        {OD: {"max_ejection_time": "10s"}},
        "clusters[0].outlier_detection.max_ejection_time: must be >= base_ejection_time (30s)",
    ),
    case(
        {OD: {"base_ejection_time": "1m", "max_ejection_time": "30s"}},
        "clusters[0].outlier_detection.max_ejection_time: must be >= base_ejection_time (1m)",
    ),
    case(
        {OD: {"max_ejection_percent": 101}},
        "clusters[0].outlier_detection.max_ejection_percent: must be between 0 and 100",
    ),
    case(
        {OD: {"max_ejection_percent": -1}},
        "clusters[0].outlier_detection.max_ejection_percent: must be between 0 and 100",
    ),
    case(
        {OD: {"max_ejection_percent": 12.5}},
        "clusters[0].outlier_detection.max_ejection_percent: expected an integer, got 12.5",
    ),
]

HEALTH_CHECKS = [
    case({HC: "/healthz"}, 'clusters[0].health_check: expected a mapping, got "/healthz"'),
    case({HC: {"path": "healthz"}}, 'clusters[0].health_check.path: must start with "/"'),
    case({HC: {"path": 5}}, "clusters[0].health_check.path: expected a string, got 5"),
    case({HC: {"path": "/a b"}}, f'clusters[0].health_check.path: invalid path "/a b" {CHECK_PATH}'),
    case({HC: {"path": "/a#b"}}, f'clusters[0].health_check.path: invalid path "/a#b" {CHECK_PATH}'),
    case({HC: {"path": "/ä"}}, f'clusters[0].health_check.path: invalid path "/ä" {CHECK_PATH}'),
    case({HC: {"interval": "0s"}}, "clusters[0].health_check.interval: must be > 0"),
    case({HC: {"timeout": "0s"}}, "clusters[0].health_check.timeout: must be > 0"),
    case({HC: {"timeout": "6s"}}, "clusters[0].health_check.timeout: must be <= interval (5s)"),
    case({HC: {"interval": "1s", "timeout": "1001ms"}}, "clusters[0].health_check.timeout: must be <= interval (1s)"),
    case({HC: {"unhealthy_threshold": 0}}, "clusters[0].health_check.unhealthy_threshold: must be >= 1"),
    case({HC: {"healthy_threshold": 0}}, "clusters[0].health_check.healthy_threshold: must be >= 1"),
    case({HC: {"panic_threshold": 101}}, "clusters[0].health_check.panic_threshold: must be between 0 and 100"),
    case({HC: {"method": "HEAD"}}, "clusters[0].health_check.method: unknown key"),
]

BUDGETS = [
    case({BU: 0.2}, "clusters[0].retry_budget: expected a mapping, got 0.2"),
    case({BU: {"ratio": 1.5}}, "clusters[0].retry_budget.ratio: must be between 0 and 1"),
    case({BU: {"ratio": -0.1}}, "clusters[0].retry_budget.ratio: must be between 0 and 1"),
    case({BU: {"ratio": "20%"}}, 'clusters[0].retry_budget.ratio: expected a number, got "20%"'),
    case({BU: {"min_per_second": -1}}, "clusters[0].retry_budget.min_per_second: must be >= 0"),
    case({BU: {"window": "999ms"}}, "clusters[0].retry_budget.window: must be >= 1s"),
    case({BU: {"window": "0s"}}, "clusters[0].retry_budget.window: must be > 0"),
    case({BU: {"window": 10}}, f"clusters[0].retry_budget.window: {DURATION}, got 10"),
]

OTHER_CLUSTER_KEYS = [
    case({f"{C}.server_name": "x"}, 'clusters[0].server_name: unknown key (did you mean "tls.server_name"?)'),
    case({f"{C}.circuit_braker": {}}, 'clusters[0].circuit_braker: unknown key (did you mean "circuit_breaker"?)'),
]

RATE_LIMIT_SERVICE = [
    case({"rate_limit_service": "127.0.0.1:6379"}, 'rate_limit_service: expected a mapping, got "127.0.0.1:6379"'),
    case({"rate_limit_service": {}}, "rate_limit_service.redis: required"),
    case(
        {"rate_limit_service": {"redis": "redis://127.0.0.1:6379"}},
        'rate_limit_service.redis: invalid address "redis://127.0.0.1:6379" (expected host:port, not a URL)',
    ),
    case(
        {"rate_limit_service": {"redis": "redis"}},
        'rate_limit_service.redis: invalid address "redis" (expected host:port)',
    ),
    case({"rate_limit_service": {**SERVICE, "timeout": "0ms"}}, "rate_limit_service.timeout: must be > 0"),
    case({"rate_limit_service": {**SERVICE, "prefix": ""}}, f'rate_limit_service.prefix: invalid prefix "" {PREFIX}'),
    case(
        {"rate_limit_service": {**SERVICE, "prefix": "a b"}},
        f'rate_limit_service.prefix: invalid prefix "a b" {PREFIX}',
    ),
    case({"rate_limit_service": {**SERVICE, "password": "x"}}, "rate_limit_service.password: unknown key"),
    # An invalid service is reported once, at itself; the shared limit that needs it is not blamed too.
    case(
        {"rate_limit_service": None, RL: {"rps": 1, "shared": True}},
        "rate_limit_service: expected a mapping, got null",
    ),
]


@pytest.mark.parametrize(
    ("edits", "expected"),
    [
        *RETRIES,
        *RATE_LIMITS,
        *FALLBACKS,
        *BREAKERS,
        *OUTLIERS,
        *HEALTH_CHECKS,
        *BUDGETS,
        *OTHER_CLUSTER_KEYS,
        *RATE_LIMIT_SERVICE,
    ],
)
def test_rejected(edits: Mapping[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_document(edited(edits))
    assert str(info.value) == expected


def test_problems_come_in_section_order() -> None:
    text = """
service: orders
routes:
  - name: r
    cluster: orders
    retry: {attempts: 0, on: [reset, nope]}
    rate_limit: {rps: 10, shared: true}
    fallback: {cluster: orders}
clusters:
  - name: orders
    endpoints: [127.0.0.1:9001]
    circuit_breaker: {open_for: 0s}
    health_check: {interval: 1s, timeout: 2s}
limits: {max_headers: 0}
rate_limit_service: {redis: nowhere}
"""
    with pytest.raises(ConfigError) as info:
        compile_text(text)
    assert str(info.value).splitlines() == [
        "routes[0].retry.attempts: must be between 1 and 10",
        f'routes[0].retry.on[1]: unknown retry condition "nope" {RETRY_ON}',
        "routes[0].fallback.cluster: must differ from the route's cluster",
        "clusters[0].circuit_breaker.open_for: must be > 0",
        "clusters[0].health_check.timeout: must be <= interval (1s)",
        "limits.max_headers: must be >= 1",
        'rate_limit_service.redis: invalid address "nowhere" (expected host:port)',
    ]
