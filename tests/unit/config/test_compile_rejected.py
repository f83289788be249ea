"""Every rejected config, with the exact ``path: message`` lines the user sees (and no others).

Each case edits the minimal valid document of ``sample.py`` at the paths the messages name. The resilience
settings (retry, rate limits, fallbacks, breakers, outlier detection, health checks, retry budgets) have their own
file, ``test_resilience_rejected.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from gateway.config.compile import compile_document, compile_text
from gateway.config.errors import ConfigError

from .sample import DELETE, edited

DURATION = 'expected a duration string like "250ms" or "2s"'
NAME_HINT = '(use letters, digits, ".", "_", "-"; start with a letter or digit)'
SERVICE_HINT = '(use lower-case letters, digits, ".", "_", "-"; start and end with a letter or digit)'
POLICIES = "round_robin, weighted_round_robin, random, least_request, peak_ewma, ring_hash"
NEVER = 'never matches: requests are matched with "//", "." and ".." segments resolved'
R = "routes[0]"
M = "routes[0].match"
H = "routes[0].match.headers[0]"
C = "clusters[0]"


def case(edits: Mapping[str, object], *lines: str) -> object:
    return pytest.param(edits, "\n".join(lines), id=lines[0])


TOP_LEVEL = [
    case({"service": DELETE}, "service: required"),
    case({"service": 5}, "service: expected a string, got 5"),
    case({"service": None}, "service: expected a string, got null"),
    case({"service": "Orders"}, f'service: invalid service name "Orders" {SERVICE_HINT}'),
    case({"service": "orders-"}, f'service: invalid service name "orders-" {SERVICE_HINT}'),
    case({"service": ""}, f'service: invalid service name "" {SERVICE_HINT}'),
    case({"servce": "x"}, 'servce: unknown key (did you mean "service"?)'),
    case({"route": []}, 'route: unknown key (did you mean "routes"?)'),
    case({"zzz": 1}, "zzz: unknown key"),
    case({"config_service": {}}, "config_service.url: required", "config_service.token_file: required"),
    case({"tls": {}}, "tls.cert_file: required", "tls.key_file: required"),
    case({"mesh": {}}, "mesh: needs a config_service section (the mesh certificate comes from it)"),
    case({"routes": DELETE}, "routes: required"),
    case({"routes": {}}, "routes: expected a list, got a mapping"),
    case({"routes": []}, "routes: must have at least one route"),
    case({"routes": None}, "routes: expected a list, got null"),
    case({"clusters": DELETE}, "clusters: required"),
    case({"clusters": "orders"}, 'clusters: expected a list, got "orders"'),
    case({"clusters": []}, 'routes[0].cluster: unknown cluster "orders"', "clusters: must have at least one cluster"),
]

LISTENERS = [
    case({"listen": "foo"}, 'listen: invalid address "foo" (expected host:port)'),
    case({"listen": 8080}, 'listen: expected an address string like "127.0.0.1:8080", got 8080'),
    case({"listen": "127.0.0.1:0"}, 'listen: invalid address "127.0.0.1:0" (port must be 1..65535)'),
    case({"listen": ":8080"}, 'listen: invalid address ":8080" (host is empty)'),
    case(
        {"listen": "http://127.0.0.1:80"},
        'listen: invalid address "http://127.0.0.1:80" (expected host:port, not a URL)',
    ),
    case({"admin": "[::1]"}, 'admin: invalid address "[::1]" (expected [host]:port)'),
    case({"admin": "127.0.0.1:8080"}, "admin: must differ from listen (127.0.0.1:8080)"),
    case({"listen": "LOCALHOST:1", "admin": "localhost:1"}, "admin: must differ from listen (LOCALHOST:1)"),
    case({"listen": "127.0.0.1:9901"}, "admin: must differ from listen (127.0.0.1:9901)"),
    case({"listen": "0.0.0.0:9901"}, "admin: uses the same port as listen (0.0.0.0:9901)"),
    case({"listen": "[::1]:1", "admin": "[::]:1"}, "admin: uses the same port as listen ([::1]:1)"),
    case({"listen": "localhost:1", "admin": "0.0.0.0:1"}, "admin: uses the same port as listen (localhost:1)"),
]

ROUTES = [
    case({"routes[0]": "r"}, 'routes[0]: expected a mapping, got "r"'),
    case({f"{R}.name": DELETE}, "routes[0].name: required"),
    case({f"{R}.name": 5}, "routes[0].name: expected a string, got 5"),
    case({f"{R}.name": "a b"}, f'routes[0].name: invalid name "a b" {NAME_HINT}'),
    case({f"{R}.name": "-a"}, f'routes[0].name: invalid name "-a" {NAME_HINT}'),
    case(
        {"routes[1]": {"name": "s", "cluster": "orders"}, "routes[2]": {"name": "r", "cluster": "orders"}},
        'routes[2].name: duplicate route name "r" (first at routes[0])',
    ),
    case({f"{R}.matc": {}}, 'routes[0].matc: unknown key (did you mean "match"?)'),
    case({f"{R}.cluster": DELETE}, "routes[0]: needs one of cluster, split"),
    case({f"{R}.split": [{"cluster": "orders", "weight": 1}]}, "routes[0]: use only one of cluster, split"),
    case({f"{R}.cluster": "ordrs"}, 'routes[0].cluster: unknown cluster "ordrs" (did you mean "orders"?)'),
    case({f"{R}.cluster": "zzz"}, 'routes[0].cluster: unknown cluster "zzz"'),
    case({f"{R}.cluster": 5}, "routes[0].cluster: expected a string, got 5"),
    case({f"{R}.timeout": 5}, f"routes[0].timeout: {DURATION}, got 5"),
    case({f"{R}.timeout": 2.5}, f"routes[0].timeout: {DURATION}, got 2.5"),
    case({f"{R}.timeout": None}, f"routes[0].timeout: {DURATION}, got null"),
    case({f"{R}.timeout": "2x"}, 'routes[0].timeout: invalid duration "2x" (use e.g. 250ms, 2s, 1m)'),
    case({f"{R}.timeout": "-1s"}, 'routes[0].timeout: invalid duration "-1s" (use e.g. 250ms, 2s, 1m)'),
    case({f"{R}.timeout": "1m30s"}, 'routes[0].timeout: invalid duration "1m30s" (use e.g. 250ms, 2s, 1m)'),
    case({f"{R}.timeout": "0s"}, "routes[0].timeout: must be > 0"),
    case({f"{R}.auth": "bogus"}, 'routes[0].auth: unknown mode "bogus" (one of required, optional, none)'),
    case({f"{R}.auth": "required"}, 'routes[0].auth: "required" needs an authn section'),
]

MATCHES = [
    case({M: "/x"}, 'routes[0].match: expected a mapping, got "/x"'),
    case({M: None}, "routes[0].match: expected a mapping, got null"),
    case({f"{M}.prefix": "/x"}, 'routes[0].match.prefix: unknown key (did you mean "path_prefix"?)'),
    case({f"{M}.path": "x"}, 'routes[0].match.path: must start with "/"'),
    case({f"{M}.path_prefix": "api"}, 'routes[0].match.path_prefix: must start with "/"'),
    case({f"{M}.path": "/a?b=1"}, 'routes[0].match.path: must not contain a query ("?") or fragment ("#")'),
    case({f"{M}.path_prefix": "/a#b"}, 'routes[0].match.path_prefix: must not contain a query ("?") or fragment ("#")'),
    case({f"{M}.path": "/a//b"}, f"routes[0].match.path: {NEVER}"),
    case({f"{M}.path": "/a/../b"}, f"routes[0].match.path: {NEVER}"),
    case({f"{M}.path": "/a/."}, f"routes[0].match.path: {NEVER}"),
    case({f"{M}.path": "/.."}, f"routes[0].match.path: {NEVER}"),
    case({f"{M}.path_prefix": "//api"}, f"routes[0].match.path_prefix: {NEVER}"),
    case({f"{M}.path_prefix": "/a/./b"}, f"routes[0].match.path_prefix: {NEVER}"),
    case({f"{M}.path": "/a", f"{M}.path_prefix": "/b"}, "routes[0].match: use only one of path, path_prefix"),
    case(
        {f"{M}.path": "/a", f"{M}.path_prefix": "/b", f"{M}.path_regex": "/c"},
        "routes[0].match: use only one of path, path_prefix, path_regex",
    ),
    case(
        {f"{M}.path_regex": "("},
        "routes[0].match.path_regex: invalid regular expression: missing ), unterminated subpattern at position 0",
    ),
    case({f"{M}.path_regex": 5}, "routes[0].match.path_regex: expected a string, got 5"),
    case({f"{M}.methods": []}, "routes[0].match.methods: must not be empty"),
    case({f"{M}.methods": "GET"}, 'routes[0].match.methods: expected a list, got "GET"'),
    case({f"{M}.methods": ["GET", "GE T"]}, 'routes[0].match.methods[1]: invalid HTTP method "GE T"'),
    case({f"{M}.methods": [1]}, "routes[0].match.methods[0]: expected a string, got 1"),
    case({f"{M}.host": "api.example.com:80"}, "routes[0].match.host: must not include a port"),
    case(
        {f"{M}.host": "a b"},
        'routes[0].match.host: invalid host "a b" (expected a name like "api.example.com" or "*.example.com")',
    ),
    case(
        {f"{M}.host": "*example.com"},
        'routes[0].match.host: invalid host "*example.com" (expected a name like "api.example.com" or "*.example.com")',
    ),
    case(
        {f"{M}.host": "example.com."},
        'routes[0].match.host: invalid host "example.com." (expected a name like "api.example.com" or "*.example.com")',
    ),
    case(
        {f"{M}.host": "foo.*.com"},
        'routes[0].match.host: invalid host "foo.*.com" (expected a name like "api.example.com" or "*.example.com")',
    ),
    case({f"{M}.headers": {}}, "routes[0].match.headers: expected a list, got a mapping"),
    case({f"{M}.headers": ["x-a"]}, 'routes[0].match.headers[0]: expected a mapping, got "x-a"'),
    case({f"{M}.headers": [{"exact": "x"}]}, "routes[0].match.headers[0].name: required"),
    case({f"{M}.headers": [{"name": "x"}]}, "routes[0].match.headers[0]: needs one of exact, prefix, regex, present"),
    case(
        {f"{M}.headers": [{"name": "x", "exact": "a", "regex": "b"}]},
        "routes[0].match.headers[0]: use only one of exact, regex",
    ),
    case(
        {f"{M}.headers": [{"name": "x", "present": False}]},
        "routes[0].match.headers[0].present: must be true (matching a missing header is not supported)",
    ),
    case(
        {f"{M}.headers": [{"name": "x", "present": "yes"}]},
        'routes[0].match.headers[0].present: expected true or false, got "yes"',
    ),
    case(
        {f"{M}.headers": [{"name": "x", "regex": "["}]},
        "routes[0].match.headers[0].regex: invalid regular expression: unterminated character set at position 0",
    ),
    case({f"{M}.headers": [{"name": "a:b", "exact": "x"}]}, f'{H}.name: invalid header name "a:b"'),
    case({f"{M}.headers": [{"name": "x", "exact": 5}]}, f"{H}.exact: expected a string, got 5"),
    case({f"{M}.headers": [{"name": "x", "exact": "a", "valu": "b"}]}, f"{H}.valu: unknown key"),
    case(
        {f"{M}.headers": [{"nam": "x", "exact": "a"}]},
        f'{H}.nam: unknown key (did you mean "name"?)',
        f"{H}.name: required",
    ),
]

SPLITS = [
    case({f"{R}.cluster": DELETE, f"{R}.split": []}, "routes[0].split: must have at least one entry"),
    case({f"{R}.cluster": DELETE, f"{R}.split": {"orders": 1}}, "routes[0].split: expected a list, got a mapping"),
    case({f"{R}.cluster": DELETE, f"{R}.split": ["orders"]}, 'routes[0].split[0]: expected a mapping, got "orders"'),
    case(
        {f"{R}.cluster": DELETE, f"{R}.split": [{"cluster": "ordrs", "weight": 1}]},
        'routes[0].split[0].cluster: unknown cluster "ordrs" (did you mean "orders"?)',
    ),
    case({f"{R}.cluster": DELETE, f"{R}.split": [{"cluster": "orders"}]}, "routes[0].split[0].weight: required"),
    case({f"{R}.cluster": DELETE, f"{R}.split": [{"weight": 1}]}, "routes[0].split[0].cluster: required"),
    case(
        {f"{R}.cluster": DELETE, f"{R}.split": [{"cluster": "orders", "weight": -1}]},
        "routes[0].split[0].weight: must be >= 0",
    ),
    case(
        {f"{R}.cluster": DELETE, f"{R}.split": [{"cluster": "orders", "weight": True}]},
        "routes[0].split[0].weight: expected an integer, got true",
    ),
    case(
        {f"{R}.cluster": DELETE, f"{R}.split": [{"cluster": "orders", "weight": 1.5}]},
        "routes[0].split[0].weight: expected an integer, got 1.5",
    ),
    case(
        {f"{R}.cluster": DELETE, f"{R}.split": [{"cluster": "orders", "weight": "90"}]},
        'routes[0].split[0].weight: expected an integer, got "90"',
    ),
    case(
        {f"{R}.cluster": DELETE, f"{R}.split": [{"cluster": "orders", "weight": 0}]},
        "routes[0].split: weights sum to 0",
    ),
    case(
        {
            f"{R}.cluster": DELETE,
            f"{R}.split": [{"cluster": "orders", "weight": 1}, {"cluster": "orders", "weight": 2}],
        },
        'routes[0].split[1].cluster: duplicate cluster "orders" (first at routes[0].split[0])',
    ),
    case(
        {f"{R}.cluster": DELETE, f"{R}.split": [{"cluster": "orders", "weight": 1, "wieght": 2}]},
        'routes[0].split[0].wieght: unknown key (did you mean "weight"?)',
    ),
]

REWRITES = [
    case({f"{R}.rewrite": {}}, "routes[0].rewrite: must set prefix or host"),
    case({f"{R}.rewrite": "/v2"}, 'routes[0].rewrite: expected a mapping, got "/v2"'),
    case({f"{R}.rewrite": {"prefix": "/v2"}}, "routes[0].rewrite.prefix: needs match.path_prefix or match.path"),
    case(
        {f"{M}.path_regex": "/a.*", f"{R}.rewrite": {"prefix": "/v2"}},
        "routes[0].rewrite.prefix: needs match.path_prefix or match.path",
    ),
    case({f"{M}.path_prefix": "/a", f"{R}.rewrite": {"prefix": "v2"}}, 'routes[0].rewrite.prefix: must start with "/"'),
    case(
        {f"{R}.rewrite": {"host": "a b"}},
        'routes[0].rewrite.host: invalid host "a b" (expected a name like "api.internal", optionally with ":port")',
    ),
    case(
        {f"{R}.rewrite": {"path": "/x"}},
        "routes[0].rewrite.path: unknown key",
        "routes[0].rewrite: must set prefix or host",
    ),
]

CLUSTERS = [
    case(
        {"clusters[0]": "orders"},
        'routes[0].cluster: unknown cluster "orders"',
        'clusters[0]: expected a mapping, got "orders"',
    ),
    case({f"{C}.name": DELETE}, 'routes[0].cluster: unknown cluster "orders"', "clusters[0].name: required"),
    case({f"{C}.name": "a b", f"{R}.cluster": "a b"}, f'clusters[0].name: invalid name "a b" {NAME_HINT}'),
    case(
        {"clusters[1]": {"name": "orders", "endpoints": ["127.0.0.1:1"]}},
        'clusters[1].name: duplicate cluster name "orders" (first at clusters[0])',
    ),
    case({f"{C}.nmae": "x"}, 'clusters[0].nmae: unknown key (did you mean "name"?)'),
    case({f"{C}.endpoints": DELETE}, "clusters[0]: needs one of endpoints, discovery"),
    case({f"{C}.discovery": {"dns": "orders:80"}}, "clusters[0]: use only one of endpoints, discovery"),
    case({f"{C}.endpoints": []}, "clusters[0].endpoints: must have at least one endpoint"),
    case({f"{C}.endpoints": "127.0.0.1:1"}, 'clusters[0].endpoints: expected a list, got "127.0.0.1:1"'),
    case({f"{C}.endpoints": ["foo"]}, 'clusters[0].endpoints[0]: invalid address "foo" (expected host:port)'),
    case({f"{C}.endpoints": [5]}, "clusters[0].endpoints[0]: expected an address string or a mapping, got 5"),
    case(
        {f"{C}.endpoints": ["127.0.0.1:1", "127.0.0.1:2", {"address": "127.0.0.1:1"}]},
        'clusters[0].endpoints[2]: duplicate endpoint "127.0.0.1:1" (first at clusters[0].endpoints[0])',
    ),
    case(
        {f"{C}.endpoints": [{"address": "127.0.0.1:1", "weight": 0}]},
        "clusters[0].endpoints[0].weight: must be between 1 and 1000",
    ),
    case(
        {f"{C}.endpoints": [{"address": "127.0.0.1:1", "weight": 1001}]},
        "clusters[0].endpoints[0].weight: must be between 1 and 1000",
    ),
    case({f"{C}.endpoints": [{"weight": 2}]}, "clusters[0].endpoints[0].address: required"),
    case(
        {f"{C}.endpoints": [{"address": "127.0.0.1:1", "wieght": 2}]},
        'clusters[0].endpoints[0].wieght: unknown key (did you mean "weight"?)',
    ),
    case({f"{C}.endpoints": DELETE, f"{C}.discovery": "dns"}, 'clusters[0].discovery: expected a mapping, got "dns"'),
    case({f"{C}.endpoints": DELETE, f"{C}.discovery": {}}, "clusters[0].discovery: needs one of dns, registry"),
    case(
        {f"{C}.endpoints": DELETE, f"{C}.discovery": {"refresh": "5s"}},
        "clusters[0].discovery: needs one of dns, registry",
    ),
    case(
        {f"{C}.endpoints": DELETE, f"{C}.discovery": {"dns": "orders:80", "registry": "orders"}},
        "clusters[0].discovery: use only one of dns, registry",
    ),
    # The registry needs a config service to ask; this document has no config_service section.
    case(
        {f"{C}.endpoints": DELETE, f"{C}.discovery": {"registry": "orders"}},
        "clusters[0].discovery.registry: needs a config_service section",
    ),
    case(
        {f"{C}.endpoints": DELETE, f"{C}.discovery": {"registry": "Orders"}},
        f'clusters[0].discovery.registry: invalid service name "Orders" {SERVICE_HINT}',
    ),
    case(
        {f"{C}.endpoints": DELETE, f"{C}.discovery": {"registry": ["orders"]}},
        "clusters[0].discovery.registry: expected a string, got a list",
    ),
    case(
        {f"{C}.endpoints": DELETE, f"{C}.discovery": {"registry": "orders", "refresh": "5s"}},
        "clusters[0].discovery.refresh: only allowed with dns (the registry is watched, not polled)",
        "clusters[0].discovery.registry: needs a config_service section",
    ),
    case(
        {f"{C}.endpoints": DELETE, f"{C}.discovery": {"registy": "orders"}},
        'clusters[0].discovery.registy: unknown key (did you mean "registry"?)',
        "clusters[0].discovery: needs one of dns, registry",
    ),
    case(
        {f"{C}.endpoints": DELETE, f"{C}.discovery": {"dns": "orders"}},
        'clusters[0].discovery.dns: invalid address "orders" (expected host:port)',
    ),
    case(
        {f"{C}.endpoints": DELETE, f"{C}.discovery": {"dns": "orders:80", "refresh": "0s"}},
        "clusters[0].discovery.refresh: must be > 0",
    ),
    case(
        {f"{C}.endpoints": DELETE, f"{C}.discovery": {"dns": "orders:80", "refrsh": "1s"}},
        'clusters[0].discovery.refrsh: unknown key (did you mean "refresh"?)',
    ),
    case({f"{C}.lb": "x"}, f'clusters[0].lb: unknown policy "x" (one of {POLICIES})'),
    case({f"{C}.lb": "ROUND_ROBIN"}, f'clusters[0].lb: unknown policy "ROUND_ROBIN" (one of {POLICIES})'),
    case({f"{C}.lb": ["random"]}, "clusters[0].lb: expected a string, got a list"),
    case({f"{C}.hash_on": "client"}, "clusters[0].hash_on: only allowed with lb: ring_hash"),
    case(
        {f"{C}.lb": "least_request", f"{C}.hash_on": "header:x"}, "clusters[0].hash_on: only allowed with lb: ring_hash"
    ),
    case(
        {f"{C}.lb": "ring_hash", f"{C}.hash_on": "ip"},
        'clusters[0].hash_on: invalid value "ip" (use client, header:<name> or cookie:<name>)',
    ),
    case(
        {f"{C}.lb": "ring_hash", f"{C}.hash_on": "header:"},
        'clusters[0].hash_on: invalid value "header:" (use client, header:<name> or cookie:<name>)',
    ),
    case({f"{C}.lb": "ring_hash", f"{C}.hash_on": 1}, "clusters[0].hash_on: expected a string, got 1"),
    case({f"{C}.connect_timeout": "0ms"}, "clusters[0].connect_timeout: must be > 0"),
    case({f"{C}.connect_timeout": 1}, f"clusters[0].connect_timeout: {DURATION}, got 1"),
    case({f"{C}.max_connections": 0}, "clusters[0].max_connections: must be >= 1"),
    case({f"{C}.max_connections": "10"}, 'clusters[0].max_connections: expected an integer, got "10"'),
    case({f"{C}.max_connections": True}, "clusters[0].max_connections: expected an integer, got true"),
    case({f"{C}.tls": []}, "clusters[0].tls: expected a mapping, got a list"),
    case(
        {f"{C}.mesh_identity": "spiffe://x/service/y"},
        "clusters[0].mesh_identity: needs a top-level mesh section (the gateway's own mesh certificate)",
    ),
]

LIMITS = [
    case({"limits": []}, "limits: expected a mapping, got a list"),
    case({"limits.max_body": 1}, 'limits.max_body: unknown key (did you mean "max_body_size"?)'),
    case({"limits.max_request_line": 0}, "limits.max_request_line: must be > 0"),
    case({"limits.max_request_line": "0KiB"}, "limits.max_request_line: must be > 0"),
    case(
        {"limits.max_header_size": "8k"},
        'limits.max_header_size: invalid size "8k" (use e.g. 8190, 512KiB, 10MiB, 1MB)',
    ),
    case(
        {"limits.max_header_size": True},
        'limits.max_header_size: expected a size (bytes, or a string like "512KiB"), got true',
    ),
    case({"limits.max_headers": 0}, "limits.max_headers: must be >= 1"),
    case({"limits.max_headers": "100"}, 'limits.max_headers: expected an integer, got "100"'),
    case({"limits.max_body_size": -1}, "limits.max_body_size: must be >= 0"),
    case(
        {"limits.max_body_size": "1.5MiB"},
        'limits.max_body_size: invalid size "1.5MiB" (use e.g. 8190, 512KiB, 10MiB, 1MB)',
    ),
    case({"limits.drain_timeout": 15}, f"limits.drain_timeout: {DURATION}, got 15"),
    case({"limits.escaped_slashes": "x"}, 'limits.escaped_slashes: unknown mode "x" (one of unescape, reject, keep)'),
]

TELEMETRY = [
    case({"telemetry": "on"}, 'telemetry: expected a mapping, got "on"'),
    case({"telemetry.tracing": {}}, "telemetry.tracing.otlp_endpoint: required"),
    case({"telemetry.tracing": "on"}, 'telemetry.tracing: expected a mapping, got "on"'),
    case(
        {"telemetry.tracing": {"otlp_endpoint": "127.0.0.1:4318"}},
        'telemetry.tracing.otlp_endpoint: expected an http:// or https:// URL like "http://127.0.0.1:4318", '
        'got "127.0.0.1:4318"',
    ),
    case(
        {"telemetry.tracing": {"otlp_endpoint": "http://127.0.0.1:99999"}},
        'telemetry.tracing.otlp_endpoint: bad port in "http://127.0.0.1:99999"',
    ),
    case(
        {"telemetry.tracing": {"otlp_endpoint": "https://user:s3cret@collector:4318"}},
        "telemetry.tracing.otlp_endpoint: must not carry credentials (set OTEL_EXPORTER_OTLP_TRACES_HEADERS instead)",
    ),
    case(
        {"telemetry.tracing": {"otlp_endpoint": "http://c:4317/v1/traces", "protocol": "grpc"}},
        "telemetry.tracing.otlp_endpoint: a gRPC endpoint has no path (host and port only)",
    ),
    case(
        {"telemetry.tracing": {"otlp_endpoint": "http://c:4318", "protocol": "http/json"}},
        'telemetry.tracing.protocol: unknown protocol "http/json" (one of http/protobuf, grpc)',
    ),
    case(
        {"telemetry.tracing": {"otlp_endpoint": "http://c:4318", "sample_ratio": 1.5}},
        "telemetry.tracing.sample_ratio: must be between 0.0 and 1.0",
    ),
    case(
        {"telemetry.tracing": {"otlp_endpoint": "http://c:4318", "max_traces_per_second": 0}},
        "telemetry.tracing.max_traces_per_second: must be > 0.0",
    ),
    case(
        {"telemetry.tracing": {"otlp_endpoint": "http://c:4318", "propagators": ["b3"]}},
        'telemetry.tracing.propagators: "tracecontext" is always on: list it with the others',
    ),
    case(
        {"telemetry.tracing": {"otlp_endpoint": "http://c:4318", "propagators": ["tracecontext", "jaeger"]}},
        'telemetry.tracing.propagators[1]: unknown propagator "jaeger" (one of tracecontext, baggage, b3, b3multi)',
    ),
    case(
        {"telemetry.tracing": {"otlp_endpoint": "http://c:4318", "propagators": ["tracecontext", "tracecontext"]}},
        'telemetry.tracing.propagators[1]: "tracecontext" is listed twice',
    ),
    case(
        {"telemetry.tracing": {"otlp_endpoint": "http://c:4318", "propagators": []}},
        "telemetry.tracing.propagators: must not be empty",
    ),
    case(
        {"telemetry.tracing": {"otlp_endpoint": "http://c:4318", "batch": {"delay": "0s"}}},
        "telemetry.tracing.batch.delay: must be > 0",
    ),
    case(
        {"telemetry.tracing": {"otlp_endpoint": "http://c:4318", "sampling": 1}},
        'telemetry.tracing.sampling: unknown key (did you mean "sample_ratio"?)',
    ),
    case({"telemetry.metrics": {"exemplars": "on"}}, 'telemetry.metrics.exemplars: expected true or false, got "on"'),
    case({"telemetry.log": {}}, 'telemetry.log: unknown key (did you mean "logs"?)'),
    case({"telemetry.logs": None}, "telemetry.logs: expected a mapping, got null"),
    case(
        {"telemetry.logs.level": "trace"},
        'telemetry.logs.level: unknown level "trace" (one of debug, info, warning, error)',
    ),
    case({"telemetry.logs.access_log": "yes"}, 'telemetry.logs.access_log: expected true or false, got "yes"'),
    case({"telemetry.logs.access_log": 1}, "telemetry.logs.access_log: expected true or false, got 1"),
]


@pytest.mark.parametrize(
    ("edits", "expected"),
    [*TOP_LEVEL, *LISTENERS, *ROUTES, *MATCHES, *SPLITS, *REWRITES, *CLUSTERS, *LIMITS, *TELEMETRY],
)
def test_rejected(edits: Mapping[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_document(edited(edits))
    assert str(info.value) == expected


def test_every_problem_is_reported_in_one_error() -> None:
    text = """
service: Orders
listen: foo
authz: {engine: embedded}
routes:
  - name: read
    matc: {path_prefix: /orders}
    cluster: ordrs
    timeout: 5
  - name: read
    split: [{cluster: orders, weight: 0}]
    retry: {attempts: 30}
clusters:
  - name: orders
    endpoints: [127.0.0.1:9001, 127.0.0.1:9001]
    lb: fastest
telemetry: {logs: {level: loud}}
"""
    with pytest.raises(ConfigError) as info:
        compile_text(text)
    assert str(info.value).splitlines() == [
        f'service: invalid service name "Orders" {SERVICE_HINT}',
        'listen: invalid address "foo" (expected host:port)',
        "authz.bundle: required",
        'routes[0].matc: unknown key (did you mean "match"?)',
        'routes[0].cluster: unknown cluster "ordrs" (did you mean "orders"?)',
        f"routes[0].timeout: {DURATION}, got 5",
        'routes[1].name: duplicate route name "read" (first at routes[0])',
        "routes[1].split: weights sum to 0",
        "routes[1].retry.attempts: must be between 1 and 10",
        'clusters[0].endpoints[1]: duplicate endpoint "127.0.0.1:9001" (first at clusters[0].endpoints[0])',
        f'clusters[0].lb: unknown policy "fastest" (one of {POLICIES})',
        'telemetry.logs.level: unknown level "loud" (one of debug, info, warning, error)',
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "(document): the document is empty"),
        ("# nothing here\n", "(document): the document is empty"),
        ("[]", "(document): expected a mapping at the top level, got a list"),
        ("orders", '(document): expected a mapping at the top level, got "orders"'),
        ("42", "(document): expected a mapping at the top level, got 42"),
        ("service: a\nservice: b\n", '(document): duplicate key "service" (lines 1 and 2)'),
        (
            "service: a\nroutes:\n  - name: r\n    cluster: orders\n    name: s\n",
            'routes[0]: duplicate key "name" (lines 3 and 5)',
        ),
        (
            "service: [a\n",
            "line 2, column 1: expected ',' or ']', but got '<stream end>'"
            " (while parsing a flow sequence at line 1, column 10)",
        ),
        # YAML 1.1 would read `yes` as true and accept it; here it is the string it looks like.
        (
            "service: a\nroutes: [{name: r, cluster: c}]\nclusters: [{name: c, endpoints: ['a:1']}]\n"
            "telemetry: {logs: {access_log: yes}}\n",
            'telemetry.logs.access_log: expected true or false, got "yes"',
        ),
        # A YAML key that is not a string (here an integer) is an unknown key like any other.
        (
            "service: a\nroutes: [{name: r, cluster: c, 1: x}]\nclusters: [{name: c, endpoints: ['a:1']}]\n",
            "routes[0].1: unknown key",
        ),
    ],
)
def test_rejected_text(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_text(text)
    assert str(info.value) == expected
