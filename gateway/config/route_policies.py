"""Compile a route's policies: its ``retry``, ``rate_limit`` and ``fallback`` sections, each to a frozen value.

Called by ``routes.py`` for every route; settled here: retry conditions split into failure kinds and statuses, the
backoff cap defaulted from its base, a rate limit's key parsed and its burst defaulted, a fallback cluster checked
against the declared clusters and the route's own, a fallback response's headers checked and its body encoded.
The HTTP token pattern, the header-name decoder and the cluster-reference check live here too, and ``routes.py``
imports them, so the dependency runs one way (``routes`` -> ``route_policies``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection

from gateway.config.schema import (
    Fields,
    Problems,
    boolean,
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
    size,
    string,
)
from gateway.config.snapshot import (
    RETRY_CONDITIONS,
    Fallback,
    FallbackResponse,
    RateLimit,
    RateLimitKey,
    RetryOn,
    RetryPolicy,
    WeightedCluster,
)
from gateway.config.values import quote

__all__ = ["TOKEN", "compile_fallback", "compile_rate_limit", "compile_retry", "header_name", "known_cluster"]

RETRY_KEYS = ("attempts", "per_try_timeout", "on", "backoff", "non_idempotent", "max_replay_body")
BACKOFF_KEYS = ("base", "max")
RATE_LIMIT_KEYS = ("rps", "burst", "key", "shared")
FIXED_RATE_LIMIT_KEYS: tuple[RateLimitKey, ...] = ("principal", "client", "route")
FALLBACK_KEYS = ("cluster", "response")
RESPONSE_KEYS = ("status", "headers", "body")

# RFC 9110 token: what an HTTP method or a header name may be made of.
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_STATUS_TEXT = re.compile(r"[0-9]{3}")
_RETRY_ON_HINT = f"one of {', '.join(RETRY_CONDITIONS)}, or a status code like {quote('503')}"
_HEADER_KEY = re.compile(rf"header:(?P<name>{TOKEN.pattern})")
_RATE_KEY_HINT = "use principal, client, route or header:<name>"
# No control characters (C0, DEL, C1) but tab: a CR or LF in a header value would split the response.
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\xa0-\U0010ffff]*")
# Framing headers follow from the body the gateway sends; a configured one could only contradict it.
_FRAMING_HEADERS = ("content-length", "transfer-encoding")
_NO_RETRY = RetryPolicy()
_NO_HEADERS: tuple[tuple[str, str], ...] = ()

header_name = matching(TOKEN, "header name")
_header_value = matching(_HEADER_VALUE, "header value", "control characters are not allowed")
_timeout = duration(positive=True)
_attempts = integer(1, 10)
_status = integer(100, 599)
_final_status = integer(200, 599)  # a 1xx is interim, never a final response
_replay_body = size(positive=False)
_rps = number(0, positive=True)
_burst = integer(1)


def compile_retry(route: Fields, timeout: float | None) -> RetryPolicy:
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


def compile_rate_limit(route: Fields, shared_limits: bool) -> RateLimit | None:
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


def compile_fallback(
    route: Fields, split: tuple[WeightedCluster, ...] | None, clusters: Collection[str] | None
) -> Fallback | None:
    fields = route.section("fallback", FALLBACK_KEYS)
    if fields is None:
        return None
    kind = fields.exactly_one(FALLBACK_KEYS)
    if kind == "cluster":
        name = fields.optional("cluster", string)
        if name is None or not known_cluster(name, fields.at("cluster"), fields.problems, clusters):
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
        name = header_name(key, entry_path, problems)
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


def known_cluster(name: str, path: str, problems: Problems, clusters: Collection[str] | None) -> bool:
    if clusters is None or name in clusters:
        return True
    problems.add(path, f"unknown cluster {quote(name)}" + did_you_mean(name, clusters))
    return False
