"""Compile the ``routes`` section: each entry becomes a frozen ``Route``, every problem recorded with its path.

Everything the request path needs is settled here: regexes compiled, methods upper-cased, header names and hosts
lower-cased, a single ``cluster`` turned into a one-entry split, cumulative split weights precomputed for bisect,
retry conditions split into failure kinds and statuses, a rate limit's burst defaulted, a fallback body encoded.
Cluster references (split entries and fallbacks) are checked against the names the ``clusters`` section declares.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from itertools import accumulate
from typing import Literal, cast

from gateway.config.schema import (
    NAME,
    NAME_HINT,
    NOT_SUPPORTED,
    Decoder,
    Fields,
    Problems,
    boolean,
    choice,
    describe,
    did_you_mean,
    duration,
    first_use,
    integer,
    items,
    join,
    mapping_of_any,
    matching,
    not_above,
    not_below,
    number,
    regex,
    size,
    string,
)
from gateway.config.snapshot import (
    RETRY_CONDITIONS,
    Fallback,
    FallbackResponse,
    HeaderMatch,
    RateLimit,
    RateLimitKey,
    RetryOn,
    RetryPolicy,
    Rewrite,
    Route,
    RouteMatch,
    WeightedCluster,
)
from gateway.config.values import quote

__all__ = ["compile_routes"]

ROUTE_KEYS = ("name", "match", "cluster", "split", "rewrite", "timeout", "auth", "retry", "rate_limit", "fallback")
MATCH_KEYS = ("path", "path_prefix", "path_regex", "methods", "host", "headers")
PATH_KINDS = ("path", "path_prefix", "path_regex")
HEADER_KINDS = ("exact", "prefix", "regex", "present")
HEADER_KEYS = ("name", *HEADER_KINDS)
SPLIT_KEYS = ("cluster", "weight")
REWRITE_KEYS = ("prefix", "host")
AuthMode = Literal["required", "optional", "none"]
AUTH_MODES: tuple[AuthMode, ...] = ("required", "optional", "none")
RETRY_KEYS = ("attempts", "per_try_timeout", "on", "backoff", "non_idempotent", "max_replay_body")
BACKOFF_KEYS = ("base", "max")
RATE_LIMIT_KEYS = ("rps", "burst", "key", "shared")
FIXED_RATE_LIMIT_KEYS: tuple[RateLimitKey, ...] = ("principal", "client", "route")
FALLBACK_KEYS = ("cluster", "response")
RESPONSE_KEYS = ("status", "headers", "body")

# RFC 9110 token: what an HTTP method or a header name may be made of.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
# A name, "*.<name>" (one or more labels in front) or a lone "*" (any host, but a Host header is required).
_HOST_MATCH = re.compile(rf"\*|(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")
_HOST_WITH_PORT = re.compile(r".*:[0-9]+")
_DOT_SEGMENT = re.compile(r"//|/\.\.?/")
_DOT_SEGMENT_END = re.compile(r"//|/\.\.?(?:/|$)")
_REWRITE_HOST = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?(?::[0-9]{1,5})?")
_STATUS_TEXT = re.compile(r"[0-9]{3}")
_RETRY_ON_HINT = f"one of {', '.join(RETRY_CONDITIONS)}, or a status code like {quote('503')}"
_HEADER_KEY = re.compile(rf"header:(?P<name>{_TOKEN.pattern})")
_RATE_KEY_HINT = "use principal, client, route or header:<name>"
# No control characters (C0, DEL, C1) but tab: a CR or LF in a header value would split the response.
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\xa0-\U0010ffff]*")
# Framing headers follow from the body the gateway sends; a configured one could only contradict it.
_FRAMING_HEADERS = ("content-length", "transfer-encoding")
_NO_RETRY = RetryPolicy()
_NO_HEADERS: tuple[tuple[str, str], ...] = ()

_route_name = matching(NAME, "name", NAME_HINT)
_method = matching(_TOKEN, "HTTP method")
_header_name = matching(_TOKEN, "header name")
_rewrite_host = matching(_REWRITE_HOST, "host", 'expected a name like "api.internal", optionally with ":port"')
_header_value = matching(_HEADER_VALUE, "header value", "control characters are not allowed")
_weight = integer(0)
_timeout = duration(positive=True)
_attempts = integer(1, 10)
_status = integer(100, 599)
_final_status = integer(200, 599)  # a 1xx is interim, never a final response
_replay_body = size(positive=False)
_rps = number(0, positive=True)
_burst = integer(1)


def compile_routes(
    value: object, problems: Problems, clusters: Collection[str] | None, *, shared_limits: bool
) -> list[Route]:
    """The routes, in file order. ``clusters`` = declared cluster names, or ``None`` to skip reference checks
    (the clusters section itself is broken, so every reference would be reported as unknown). ``shared_limits``:
    the document has a ``rate_limit_service``, so a route's rate limit may be ``shared``."""
    seen: dict[str, str] = {}
    routes: list[Route] = []
    for path, item in items(value, "routes", problems, empty="must have at least one route"):
        route = _route(item, path, problems, clusters, seen, shared_limits)
        if route is not None:
            routes.append(route)
    return routes


def _route(
    item: object,
    path: str,
    problems: Problems,
    clusters: Collection[str] | None,
    seen: dict[str, str],
    shared_limits: bool,
) -> Route | None:
    fields = Fields.of(item, path, problems, ROUTE_KEYS)
    if fields is None:
        return None
    name = fields.required("name", _route_name)
    if name is not None:
        first_use(name, fields.at("name"), path, seen, problems, "route name")
    match = _match(fields)
    split = _split(fields, clusters)
    rewrite = _rewrite(fields, match)
    timeout = fields.optional("timeout", _timeout)
    auth = _auth(fields)
    retry = _retry(fields, timeout)
    rate_limit = _rate_limit(fields, shared_limits)
    fallback = _fallback(fields, split, clusters)
    if name is None or match is None or split is None:
        return None  # already reported; the compiler raises before any Route is used
    weights = tuple(accumulate(entry.weight for entry in split))
    return Route(
        name,
        match,
        split,
        weights,
        rewrite=rewrite,
        timeout=timeout,
        auth=auth,
        retry=retry,
        rate_limit=rate_limit,
        fallback=fallback,
    )


def _match(route: Fields) -> RouteMatch | None:
    if not route.has("match"):
        return RouteMatch()  # no conditions: every request
    fields = Fields.of(route.raw["match"], route.at("match"), route.problems, MATCH_KEYS)
    if fields is None:
        return None
    fields.at_most_one(PATH_KINDS)
    return RouteMatch(
        path=fields.optional("path", _exact_path),
        path_prefix=fields.optional("path_prefix", _path_prefix),
        path_regex=fields.optional("path_regex", regex),
        methods=fields.optional("methods", _methods),
        host=fields.optional("host", _host_match),
        headers=fields.get("headers", _headers, ()),
    )


def _absolute_path(value: object, path: str, problems: Problems) -> str | None:
    text = string(value, path, problems)
    if text is None:
        return None
    if not text.startswith("/"):
        problems.add(path, 'must start with "/"')
        return None
    if "?" in text or "#" in text:
        # Neither is part of a path: a match condition with one could never match, a rewrite would mangle the URL.
        problems.add(path, 'must not contain a query ("?") or fragment ("#")')
        return None
    return text


def _request_path(unnormalized: re.Pattern[str]) -> Decoder[str]:
    """A path condition. Requests are matched after normalization, so a condition that is not normalized itself
    could never match; that is reported instead of silently dead. A prefix may end in "/." ("/.well-known")."""

    def decode(value: object, path: str, problems: Problems) -> str | None:
        text = _absolute_path(value, path, problems)
        if text is not None and unnormalized.search(text):
            problems.add(path, 'never matches: requests are matched with "//", "." and ".." segments resolved')
            return None
        return text

    return decode


_exact_path = _request_path(_DOT_SEGMENT_END)
_path_prefix = _request_path(_DOT_SEGMENT)


def _methods(value: object, path: str, problems: Problems) -> frozenset[str] | None:
    methods: set[str] = set()
    for item_path, item in items(value, path, problems, empty="must not be empty"):
        method = _method(item, item_path, problems)
        if method is not None:
            methods.add(method.upper())
    return frozenset(methods) or None


def _host_match(value: object, path: str, problems: Problems) -> str | None:
    text = string(value, path, problems)
    if text is None:
        return None
    host = text.lower()
    if _HOST_WITH_PORT.fullmatch(host):
        problems.add(path, "must not include a port")
        return None
    if _HOST_MATCH.fullmatch(host) is None:
        problems.add(path, f'invalid host {quote(text)} (expected a name like "api.example.com" or "*.example.com")')
        return None
    return host


def _headers(value: object, path: str, problems: Problems) -> tuple[HeaderMatch, ...] | None:
    entries = [_header(item, item_path, problems) for item_path, item in items(value, path, problems, empty=None)]
    return tuple(entry for entry in entries if entry is not None)


def _header(item: object, path: str, problems: Problems) -> HeaderMatch | None:
    fields = Fields.of(item, path, problems, HEADER_KEYS)
    if fields is None:
        return None
    name = fields.required("name", _header_name)
    kind = fields.exactly_one(HEADER_KINDS)
    if name is None or kind is None:
        return None
    name = name.lower()
    if kind == "present":
        if fields.get("present", boolean, True) is False:
            problems.add(fields.at("present"), "must be true (matching a missing header is not supported)")
        return HeaderMatch(name, "present")
    if kind == "regex":
        pattern = fields.optional("regex", regex)
        return HeaderMatch(name, "regex", pattern.pattern, pattern) if pattern is not None else None
    text = fields.optional(kind, string)
    return HeaderMatch(name, cast(Literal["exact", "prefix"], kind), text) if text is not None else None


def _split(route: Fields, clusters: Collection[str] | None) -> tuple[WeightedCluster, ...] | None:
    kind = route.exactly_one(("cluster", "split"))
    if kind == "cluster":
        name = route.optional("cluster", string)
        if name is None or not _known_cluster(name, route.at("cluster"), route.problems, clusters):
            return None
        return (WeightedCluster(name, 1),)
    if kind == "split":
        return _weighted(route.raw["split"], route.at("split"), route.problems, clusters)
    return None


def _weighted(
    value: object, path: str, problems: Problems, clusters: Collection[str] | None
) -> tuple[WeightedCluster, ...] | None:
    seen: dict[str, str] = {}
    split: list[WeightedCluster] = []
    entries = items(value, path, problems, empty="must have at least one entry")
    for entry_path, entry in entries:
        fields = Fields.of(entry, entry_path, problems, SPLIT_KEYS)
        if fields is None:
            continue
        name = fields.required("cluster", string)
        weight = fields.required("weight", _weight)
        if name is not None and _known_cluster(name, fields.at("cluster"), problems, clusters):
            first_use(name, fields.at("cluster"), entry_path, seen, problems, "cluster")
            if weight is not None:
                split.append(WeightedCluster(name, weight))
    if len(split) < len(entries):
        return None
    if split and sum(entry.weight for entry in split) == 0:
        problems.add(path, "weights sum to 0")
        return None
    return tuple(split) or None


def _known_cluster(name: str, path: str, problems: Problems, clusters: Collection[str] | None) -> bool:
    if clusters is None or name in clusters:
        return True
    problems.add(path, f"unknown cluster {quote(name)}" + did_you_mean(name, clusters))
    return False


def _rewrite(route: Fields, match: RouteMatch | None) -> Rewrite | None:
    if not route.has("rewrite"):
        return None
    fields = Fields.of(route.raw["rewrite"], route.at("rewrite"), route.problems, REWRITE_KEYS)
    if fields is None:
        return None
    if not fields.present(REWRITE_KEYS):
        fields.problems.add(fields.path, "must set prefix or host")
    prefix = fields.optional("prefix", _absolute_path)
    host = fields.optional("host", _rewrite_host)
    if prefix is not None and match is not None and match.path is None and match.path_prefix is None:
        # A prefix rewrite replaces the matched prefix; a regex or an any-path match has none to replace.
        fields.problems.add(fields.at("prefix"), "needs match.path_prefix or match.path")
    return Rewrite(prefix=prefix, host=host)


def _auth(route: Fields) -> AuthMode:
    """This build has no authn: a route that asks for a token would be served without one (fail-open), so that
    is an error, and the default is ``none``. When authn lands, the default becomes ``required`` (CONTRACT 2)."""
    mode = route.optional("auth", choice(AUTH_MODES, "mode"))
    if mode is not None and mode != "none":
        route.problems.add(route.at("auth"), f"{quote(mode)} needs authn, which is {NOT_SUPPORTED}")
    return "none"


def _retry(route: Fields, timeout: float | None) -> RetryPolicy:
    fields = route.section("retry", RETRY_KEYS)
    if fields is None:
        return _NO_RETRY
    attempts = fields.get("attempts", _attempts, _NO_RETRY.attempts)
    per_try_timeout = fields.optional("per_try_timeout", _timeout)
    if per_try_timeout is not None and timeout is not None:
        # The route deadline covers all tries: a longer single try would never be allowed to run its course.
        not_above(fields.at("per_try_timeout"), per_try_timeout, "timeout", timeout, fields.problems)
    on, statuses = fields.get("on", _retry_on, (_NO_RETRY.on, _NO_RETRY.statuses))
    base, maximum = _backoff(fields)
    return RetryPolicy(
        attempts=attempts,
        per_try_timeout=per_try_timeout,
        on=on,
        statuses=statuses,
        backoff_base=base,
        backoff_max=maximum,
        non_idempotent=fields.get("non_idempotent", boolean, _NO_RETRY.non_idempotent),
        max_replay_body=fields.get("max_replay_body", _replay_body, _NO_RETRY.max_replay_body),
    )


def _retry_on(value: object, path: str, problems: Problems) -> tuple[frozenset[RetryOn], frozenset[int]] | None:
    """Failure kinds and response statuses, in one list: ``[reset, "503", 504]``. A status may be written either
    way because YAML reads a bare ``503`` as a number and ``"503"`` as a string; both mean the same."""
    mark = problems.mark()
    conditions: set[RetryOn] = set()
    statuses: set[int] = set()
    for item_path, item in items(value, path, problems, empty="must not be empty"):
        if isinstance(item, str) and _STATUS_TEXT.fullmatch(item):
            item = int(item)
        if isinstance(item, int) and not isinstance(item, bool):
            status = _status(item, item_path, problems)
            if status is not None:
                statuses.add(status)
        elif isinstance(item, str):
            condition = next((known for known in RETRY_CONDITIONS if known == item), None)
            if condition is None:
                problems.add(item_path, f"unknown retry condition {quote(item)} ({_RETRY_ON_HINT})")
            else:
                conditions.add(condition)
        else:
            problems.add(item_path, f"expected a retry condition or a status code, got {describe(item)}")
    if problems.since(mark):
        return None
    return frozenset(conditions), frozenset(statuses)


def _backoff(retry: Fields) -> tuple[float, float]:
    fields = retry.section("backoff", BACKOFF_KEYS)
    if fields is None:
        return _NO_RETRY.backoff_base, _NO_RETRY.backoff_max
    mark = fields.problems.mark()
    base = fields.get("base", _timeout, _NO_RETRY.backoff_base)
    # Unset, the cap follows the base (10x, as in Envoy), so raising only the base is never an error.
    maximum = fields.get("max", _timeout, 10 * base)
    if not fields.problems.since(mark):
        not_below(fields.at("max"), maximum, "base", base, fields.problems)
    return base, maximum


def _rate_limit(route: Fields, shared_limits: bool) -> RateLimit | None:
    fields = route.section("rate_limit", RATE_LIMIT_KEYS)
    if fields is None:
        return None
    rps = fields.required("rps", _rps)
    burst = fields.optional("burst", _burst)
    key, header = _rate_limit_key(fields)
    shared = fields.get("shared", boolean, False)
    if shared and not shared_limits:
        fields.problems.add(fields.at("shared"), "needs rate_limit_service")
    if rps is None:
        return None
    # Default burst: one second's worth, and at least one request, so a slow rate still admits anything at all.
    return RateLimit(rps, burst if burst is not None else max(1, math.ceil(rps)), key, header, shared)


def _rate_limit_key(fields: Fields) -> tuple[RateLimitKey, str]:
    """What a bucket is kept per: ``(key, lower-case header name)``; the name is ``""`` unless key is header."""
    text = fields.optional("key", string)
    if text is None:
        return "client", ""
    for option in FIXED_RATE_LIMIT_KEYS:
        if option == text:
            return option, ""
    match = _HEADER_KEY.fullmatch(text)
    if match is None:
        fields.problems.add(fields.at("key"), f"invalid value {quote(text)} ({_RATE_KEY_HINT})")
        return "client", ""
    return "header", match["name"].lower()


def _fallback(
    route: Fields, split: tuple[WeightedCluster, ...] | None, clusters: Collection[str] | None
) -> Fallback | None:
    fields = route.section("fallback", FALLBACK_KEYS)
    if fields is None:
        return None
    kind = fields.exactly_one(FALLBACK_KEYS)
    if kind == "cluster":
        name = fields.optional("cluster", string)
        if name is None or not _known_cluster(name, fields.at("cluster"), fields.problems, clusters):
            return None
        if split is not None and any(entry.cluster == name for entry in split):
            # It would fail for the same reason the route's own cluster just did.
            own = "must differ from the route's cluster" if route.has("cluster") else "must not be in the route's split"
            fields.problems.add(fields.at("cluster"), own)
            return None
        return Fallback(cluster=name)
    if kind == "response":
        response = _response(fields)
        return Fallback(response=response) if response is not None else None
    return None


def _response(fallback: Fields) -> FallbackResponse | None:
    fields = fallback.section("response", RESPONSE_KEYS)
    if fields is None:
        return None
    status = fields.required("status", _final_status)
    headers = fields.get("headers", _response_headers, _NO_HEADERS)
    body = fields.get("body", string, "")
    if status is not None and body and status in (204, 304):
        fields.problems.add(fields.at("body"), f"must be empty (a {status} response has no body)")
    return FallbackResponse(status, headers, body.encode("utf-8")) if status is not None else None


def _response_headers(value: object, path: str, problems: Problems) -> tuple[tuple[str, str], ...] | None:
    """``{name: value}`` -> ``((name, value), ...)`` in file order, names as written (they are sent, not matched)."""
    entries = mapping_of_any(value, path, problems)
    if entries is None:
        return None
    seen: dict[str, str] = {}
    headers: list[tuple[str, str]] = []
    for key, raw in entries.items():
        entry_path = join(path, key if isinstance(key, str) else describe(key))
        name = _header_name(key, entry_path, problems)
        text = _header_value(raw, entry_path, problems)
        if name is None:
            continue
        if name.lower() in _FRAMING_HEADERS:
            problems.add(entry_path, "not allowed (the gateway sets it from the body)")
            continue
        first_use(name.lower(), entry_path, entry_path, seen, problems, "header")
        if text is not None:
            headers.append((name, text))
    return tuple(headers)
