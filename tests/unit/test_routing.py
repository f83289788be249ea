"""gateway.routing: first-match route selection, prefix rewriting, weighted cluster choice."""

from __future__ import annotations

import re
from collections import Counter
from itertools import accumulate

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config.snapshot import HeaderMatch, Rewrite, Route, RouteMatch, WeightedCluster
from gateway.routing import match, normalize_host, pick_cluster, rewrite_path


def make_route(
    name: str = "r",
    *,
    path: str | None = None,
    prefix: str | None = None,
    regex: str | None = None,
    methods: set[str] | None = None,
    host: str | None = None,
    headers: tuple[HeaderMatch, ...] = (),
    rewrite: str | None = None,
    split: tuple[tuple[str, int], ...] = (("c", 1),),
) -> Route:
    """A Route as compile.py would build it (the compiler itself is tested elsewhere)."""
    return Route(
        name=name,
        match=RouteMatch(
            path=path,
            path_prefix=prefix,
            path_regex=re.compile(regex) if regex is not None else None,
            methods=frozenset(methods) if methods is not None else None,
            host=host,
            headers=headers,
        ),
        split=tuple(WeightedCluster(cluster, weight) for cluster, weight in split),
        cumulative_weights=tuple(accumulate(weight for _, weight in split)),
        rewrite=Rewrite(prefix=rewrite) if rewrite is not None else None,
    )


def headers_of(*items: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(items))


NO_HEADERS = headers_of()

# --------------------------------------------------------------------------------------------------------------------
# match: one route, one condition at a time
# --------------------------------------------------------------------------------------------------------------------

PATH_CASES = [
    pytest.param({"path": "/orders"}, "/orders", True, id="exact-equal"),
    pytest.param({"path": "/orders"}, "/orders/", False, id="exact-trailing-slash-differs"),
    pytest.param({"path": "/orders"}, "/orders/1", False, id="exact-not-prefix"),
    pytest.param({"path": "/orders"}, "/Orders", False, id="exact-case-sensitive"),
    pytest.param({"prefix": "/orders"}, "/orders", True, id="prefix-equal"),
    pytest.param({"prefix": "/orders"}, "/orders/1", True, id="prefix-subpath"),
    pytest.param({"prefix": "/orders"}, "/ordersX", True, id="prefix-plain-string-like-envoy"),
    pytest.param({"prefix": "/orders"}, "/order", False, id="prefix-shorter-path"),
    pytest.param({"prefix": "/orders"}, "/v1/orders", False, id="prefix-anchored-at-start"),
    pytest.param({"prefix": "/orders/"}, "/orders", False, id="slash-prefix-needs-slash"),
    pytest.param({"prefix": "/orders/"}, "/orders/1", True, id="slash-prefix-subpath"),
    pytest.param({"prefix": "/"}, "/anything/at/all", True, id="root-prefix"),
    pytest.param({"regex": r"/orders/\d+"}, "/orders/42", True, id="regex-full"),
    pytest.param({"regex": r"/orders/\d+"}, "/orders/42/items", False, id="regex-must-match-whole-path"),
    pytest.param({"regex": r"/orders/\d+"}, "/v1/orders/42", False, id="regex-anchored-at-start"),
    pytest.param({"regex": r"/orders/\d+"}, "/orders/42\n", False, id="regex-no-dollar-newline-loophole"),
    pytest.param({}, "/whatever", True, id="no-path-condition-matches-all"),
]


@pytest.mark.parametrize(("conditions", "path", "matches"), PATH_CASES)
def test_match_path(conditions: dict[str, str], path: str, matches: bool) -> None:
    route = make_route(**conditions)  # type: ignore[arg-type]
    assert (match([route], "GET", "h", path, NO_HEADERS) is route) is matches


METHOD_CASES = [
    pytest.param(None, "PATCH", True, id="any-method"),
    pytest.param({"GET", "HEAD"}, "GET", True, id="listed"),
    pytest.param({"GET", "HEAD"}, "HEAD", True, id="listed-head"),
    pytest.param({"GET"}, "HEAD", False, id="head-not-implied-by-get"),
    pytest.param({"GET"}, "POST", False, id="not-listed"),
    pytest.param({"GET"}, "get", False, id="case-sensitive"),
]


@pytest.mark.parametrize(("methods", "method", "matches"), METHOD_CASES)
def test_match_methods(methods: set[str] | None, method: str, matches: bool) -> None:
    route = make_route(prefix="/", methods=methods)
    assert (match([route], method, "h", "/x", NO_HEADERS) is route) is matches


HOST_CASES = [
    pytest.param("api.example.com", "api.example.com", True, id="exact"),
    pytest.param("api.example.com", "API.Example.COM", True, id="case-insensitive"),
    pytest.param("api.example.com", "api.example.com:8443", True, id="port-ignored"),
    pytest.param("api.example.com", "api.example.com.", True, id="trailing-dot-ignored"),
    pytest.param("api.example.com", "api.example.com.:80", True, id="trailing-dot-and-port"),
    pytest.param("api.example.com", "example.com", False, id="other-host"),
    pytest.param("api.example.com", "xapi.example.com", False, id="no-implicit-suffix"),
    pytest.param("api.example.com", None, False, id="no-host-header"),
    pytest.param("api.example.com", "", False, id="empty-host-header"),
    pytest.param("*.example.com", "a.example.com", True, id="wildcard-one-label"),
    pytest.param("*.example.com", "a.b.example.com", True, id="wildcard-several-labels"),
    pytest.param("*.example.com", "A.Example.com:80", True, id="wildcard-case-and-port"),
    pytest.param("*.example.com", "example.com", False, id="wildcard-not-bare-domain"),
    pytest.param("*.example.com", ".example.com", False, id="wildcard-needs-a-label"),
    pytest.param("*.example.com", "aexample.com", False, id="wildcard-needs-the-dot"),
    pytest.param("*.example.com", "example.com.evil.net", False, id="wildcard-suffix-not-infix"),
    pytest.param("*", "anything.example", True, id="star-any-host"),
    pytest.param("*", None, False, id="star-still-needs-a-host"),
    pytest.param("::1", "[::1]:8080", True, id="ipv6-with-port"),
    pytest.param("::1", "[::1]", True, id="ipv6-without-port"),
    pytest.param("::1", "[::2]:8080", False, id="ipv6-other"),
    pytest.param("10.0.0.1", "10.0.0.1:80", True, id="ipv4-with-port"),
]


@pytest.mark.parametrize(("route_host", "request_host", "matches"), HOST_CASES)
def test_match_host(route_host: str, request_host: str | None, matches: bool) -> None:
    route = make_route(prefix="/", host=route_host)
    assert (match([route], "GET", request_host, "/", NO_HEADERS) is route) is matches


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("Example.COM", "example.com", id="lower"),
        pytest.param("example.com:8080", "example.com", id="port"),
        pytest.param("example.com:", "example.com", id="empty-port"),
        pytest.param("example.com.", "example.com", id="trailing-dot"),
        pytest.param("[::1]:80", "::1", id="ipv6-port"),
        pytest.param("[2001:DB8::1]", "2001:db8::1", id="ipv6-brackets-lowered"),
        pytest.param("[::1", "[::1", id="unclosed-bracket-kept"),
        pytest.param("2001:db8::1", "2001:db8::1", id="bare-ipv6-kept-whole"),
        pytest.param("", "", id="empty"),
    ],
)
def test_normalize_host(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


HEADER_CASES = [
    pytest.param(HeaderMatch("x-env", "exact", "canary"), [("X-Env", "canary")], True, id="exact"),
    pytest.param(HeaderMatch("x-env", "exact", "canary"), [("X-Env", "Canary")], False, id="exact-value-case"),
    pytest.param(HeaderMatch("x-env", "exact", "canary"), [], False, id="exact-absent"),
    pytest.param(HeaderMatch("x-env", "prefix", "can"), [("x-env", "canary")], True, id="prefix"),
    pytest.param(
        HeaderMatch("x-v", "regex", pattern=re.compile(r"v\d+")), [("X-V", "v12")], True, id="regex-fullmatch"
    ),
    pytest.param(HeaderMatch("x-v", "regex", pattern=re.compile(r"v\d+")), [("X-V", "v1x")], False, id="regex-partial"),
    pytest.param(HeaderMatch("x-debug", "present"), [("X-Debug", "")], True, id="present-empty-value"),
    pytest.param(HeaderMatch("x-debug", "present"), [], False, id="present-absent"),
    pytest.param(
        HeaderMatch("x-env", "exact", "canary"),
        [("X-Env", "canary"), ("X-Env", "prod")],
        True,
        id="first-value-decides-yes",
    ),
    pytest.param(
        HeaderMatch("x-env", "exact", "canary"),
        [("X-Env", "prod"), ("X-Env", "canary")],
        False,
        id="first-value-decides-no",
    ),
]


@pytest.mark.parametrize(("condition", "items", "matches"), HEADER_CASES)
def test_match_headers(condition: HeaderMatch, items: list[tuple[str, str]], matches: bool) -> None:
    route = make_route(prefix="/", headers=(condition,))
    assert (match([route], "GET", "h", "/", headers_of(*items)) is route) is matches


def test_match_all_header_conditions_must_hold() -> None:
    route = make_route(
        prefix="/",
        headers=(HeaderMatch("x-a", "exact", "1"), HeaderMatch("x-b", "present")),
    )
    assert match([route], "GET", "h", "/", headers_of(("X-A", "1"), ("X-B", "y"))) is route
    assert match([route], "GET", "h", "/", headers_of(("X-A", "1"))) is None
    assert match([route], "GET", "h", "/", headers_of(("X-B", "y"))) is None


# --------------------------------------------------------------------------------------------------------------------
# match: a route table, first match wins
# --------------------------------------------------------------------------------------------------------------------

TABLE = [
    make_route("health", prefix="/healthz"),
    make_route("admin-host", prefix="/", host="admin.example.com"),
    make_route("canary", prefix="/orders", headers=(HeaderMatch("x-canary", "exact", "1"),)),
    make_route("orders-read", prefix="/orders", methods={"GET", "HEAD"}),
    make_route("orders-write", prefix="/orders", methods={"POST", "PUT", "PATCH", "DELETE"}),
    make_route("order-by-id", regex=r"/items/[0-9]+"),
    make_route("exact-login", path="/login", methods={"POST"}),
    make_route("tenants", prefix="/t/", host="*.tenants.example.com"),
]


@pytest.mark.parametrize(
    ("method", "host", "path", "items", "expected"),
    [
        pytest.param("GET", "a", "/healthz", [], "health", id="first-route"),
        pytest.param("GET", "admin.example.com", "/healthz", [], "health", id="earlier-route-wins-over-host"),
        pytest.param("GET", "admin.example.com:9000", "/orders", [], "admin-host", id="host-route-before-path"),
        pytest.param("POST", "a", "/orders", [("X-Canary", "1")], "canary", id="header-route-before-method"),
        pytest.param("GET", "a", "/orders/7", [("X-Canary", "0")], "orders-read", id="header-mismatch-falls-through"),
        pytest.param("HEAD", "a", "/orders", [], "orders-read", id="method-read"),
        pytest.param("DELETE", "a", "/orders/7", [], "orders-write", id="method-write"),
        pytest.param("OPTIONS", "a", "/orders", [], None, id="method-unlisted-404"),
        pytest.param("GET", "a", "/items/12", [], "order-by-id", id="regex"),
        pytest.param("GET", "a", "/items/12a", [], None, id="regex-miss-404"),
        pytest.param("POST", "a", "/login", [], "exact-login", id="exact"),
        pytest.param("GET", "a", "/login", [], None, id="exact-wrong-method"),
        pytest.param("GET", "x.tenants.example.com", "/t/1", [], "tenants", id="wildcard-host"),
        pytest.param("GET", "tenants.example.com", "/t/1", [], None, id="wildcard-bare-domain-404"),
        pytest.param("GET", None, "/t/1", [], None, id="no-host-404"),
        pytest.param("GET", "a", "/nothing", [], None, id="no-route-404"),
    ],
)
def test_match_table(
    method: str, host: str | None, path: str, items: list[tuple[str, str]], expected: str | None
) -> None:
    route = match(TABLE, method, host, path, headers_of(*items))
    assert (route.name if route is not None else None) == expected


def test_match_empty_table() -> None:
    assert match([], "GET", "h", "/", NO_HEADERS) is None


# --------------------------------------------------------------------------------------------------------------------
# rewrite_path
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conditions", "rewrite", "path", "expected"),
    [
        pytest.param({"prefix": "/orders"}, None, "/orders/1", "/orders/1", id="no-rewrite"),
        pytest.param({"prefix": "/orders"}, "/v2/orders", "/orders/1", "/v2/orders/1", id="prefix-subpath"),
        pytest.param({"prefix": "/orders"}, "/v2/orders", "/orders", "/v2/orders", id="prefix-equal"),
        pytest.param({"prefix": "/orders"}, "/v2/orders", "/ordersX", "/v2/ordersX", id="prefix-plain-string"),
        pytest.param({"prefix": "/orders"}, "/v2/orders/", "/orders/1", "/v2/orders/1", id="no-double-slash"),
        pytest.param({"prefix": "/orders"}, "/v2/orders/", "/orders", "/v2/orders/", id="rewrite-trailing-slash"),
        pytest.param({"prefix": "/orders/"}, "/v2", "/orders/1", "/v2/1", id="matched-slash-survives"),
        pytest.param({"prefix": "/orders/"}, "/v2", "/orders/", "/v2/", id="matched-slash-survives-alone"),
        pytest.param({"prefix": "/orders/"}, "/v2/", "/orders/1", "/v2/1", id="both-slashes"),
        pytest.param({"prefix": "/api"}, "/", "/api/x", "/x", id="strip-to-root"),
        pytest.param({"prefix": "/api"}, "/", "/api", "/", id="strip-to-root-equal"),
        pytest.param({"prefix": "/api/"}, "/", "/api/x/y", "/x/y", id="strip-slash-prefix"),
        pytest.param({"prefix": "/api"}, "", "/api/x", "/x", id="empty-rewrite-stays-absolute"),
        pytest.param({"prefix": "/api"}, "", "/api", "/", id="empty-rewrite-equal"),
        pytest.param({"prefix": "/"}, "/base", "/x", "/base/x", id="root-prefix-keeps-separator"),
        pytest.param({"prefix": "/"}, "/base", "/", "/base/", id="root-prefix-root-path"),
        pytest.param({"path": "/login"}, "/auth/v2/login", "/login", "/auth/v2/login", id="exact-whole-path"),
        pytest.param({"regex": r"/u/\d+"}, "/users", "/u/12", "/users", id="regex-whole-path"),
        pytest.param({}, "/v2", "/x", "/v2/x", id="no-path-condition-prepends"),
        pytest.param({}, "/v2/", "/x", "/v2/x", id="no-path-condition-prepends-slash"),
    ],
)
def test_rewrite_path(conditions: dict[str, str], rewrite: str | None, path: str, expected: str) -> None:
    route = make_route(rewrite=rewrite, **conditions)  # type: ignore[arg-type]
    assert match([route], "GET", "h", path, NO_HEADERS) is route  # the rewrite applies to paths the route matched
    assert rewrite_path(route, path) == expected


def test_rewrite_path_without_prefix_returns_same_object() -> None:
    route = Route(
        name="r",
        match=RouteMatch(path_prefix="/"),
        split=(WeightedCluster("c", 1),),
        cumulative_weights=(1,),
        rewrite=Rewrite(host="other.example"),
    )
    path = "/a/b"
    assert rewrite_path(route, path) is path


# --------------------------------------------------------------------------------------------------------------------
# pick_cluster
# --------------------------------------------------------------------------------------------------------------------

CANARY = (("stable", 90), ("canary", 10))


@pytest.mark.parametrize(
    ("split", "r", "expected"),
    [
        pytest.param((("only", 1),), 0.0, "only", id="single"),
        pytest.param((("only", 1),), 0.999, "only", id="single-high"),
        pytest.param(CANARY, 0.0, "stable", id="lowest-r"),
        pytest.param(CANARY, 0.8999, "stable", id="just-below-boundary"),
        pytest.param(CANARY, 0.9, "canary", id="boundary-belongs-to-next"),
        pytest.param(CANARY, 0.9999999999999999, "canary", id="highest-r"),
        pytest.param((("a", 1), ("b", 1), ("c", 1)), 1 / 3, "b", id="thirds-middle"),
        pytest.param((("a", 1), ("b", 1), ("c", 1)), 0.9999999999999999, "c", id="thirds-top"),
        pytest.param((("zero", 0), ("all", 5)), 0.0, "all", id="zero-weight-first-skipped"),
        pytest.param((("a", 5), ("zero", 0), ("b", 5)), 0.5, "b", id="zero-weight-middle-skipped"),
        pytest.param((("a", 5), ("zero", 0)), 0.9999999999999999, "a", id="zero-weight-last-skipped"),
    ],
)
def test_pick_cluster(split: tuple[tuple[str, int], ...], r: float, expected: str) -> None:
    assert pick_cluster(make_route(prefix="/", split=split), r) == expected


def test_pick_cluster_distribution_follows_weights() -> None:
    route = make_route(prefix="/", split=(("a", 70), ("b", 20), ("zero", 0), ("c", 10)))
    steps = 10_000
    counts = Counter(pick_cluster(route, i / steps) for i in range(steps))  # evenly spaced r: exact shares
    assert counts == {"a": 7000, "b": 2000, "c": 1000}
