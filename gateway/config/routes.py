"""Compile the ``routes`` section: each entry becomes a frozen ``Route``, every problem recorded with its path.

Everything the request path needs is settled here: regexes compiled, methods upper-cased, header names and hosts
lower-cased, a single ``cluster`` turned into a one-entry split, cumulative split weights precomputed for bisect.
A route's policies (``retry``, ``rate_limit``, ``fallback``) are compiled by ``route_policies.py``. Cluster
references (split entries and fallbacks) are checked against the names the ``clusters`` section declares.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from itertools import accumulate
from typing import Literal, cast

from gateway.config.route_policies import (
    TOKEN,
    compile_fallback,
    compile_rate_limit,
    compile_retry,
    header_name,
    known_cluster,
)
from gateway.config.schema import (
    NAME,
    NAME_HINT,
    Decoder,
    Fields,
    Problems,
    boolean,
    choice,
    duration,
    first_use,
    integer,
    items,
    matching,
    regex,
    string,
)
from gateway.config.snapshot import (
    HeaderMatch,
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
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
# A name, "*.<name>" (one or more labels in front) or a lone "*" (any host, but a Host header is required).
_HOST_MATCH = re.compile(rf"\*|(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")
_HOST_WITH_PORT = re.compile(r".*:[0-9]+")
_DOT_SEGMENT = re.compile(r"//|/\.\.?/")
_DOT_SEGMENT_END = re.compile(r"//|/\.\.?(?:/|$)")
_REWRITE_HOST = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?(?::[0-9]{1,5})?")

_route_name = matching(NAME, "name", NAME_HINT)
_method = matching(TOKEN, "HTTP method")
_rewrite_host = matching(_REWRITE_HOST, "host", 'expected a name like "api.internal", optionally with ":port"')
_weight = integer(0)
_timeout = duration(positive=True)


def compile_routes(
    value: object,
    problems: Problems,
    clusters: Collection[str] | None,
    *,
    shared_limits: bool,
    authn: bool = False,
    authz: bool = False,
) -> list[Route]:
    """The routes, in file order. ``clusters`` = declared cluster names, or ``None`` to skip reference checks
    (the clusters section itself is broken, so every reference would be reported as unknown). ``shared_limits``:
    the document has a ``rate_limit_service``, so a route's rate limit may be ``shared``."""
    seen: dict[str, str] = {}
    routes: list[Route] = []
    for path, item in items(value, "routes", problems, empty="must have at least one route"):
        route = _route(item, path, problems, clusters, seen, shared_limits, _default_auth(authn, authz), authn)
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
    default_auth: AuthMode,
    authn: bool,
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
    auth = _auth(fields, default_auth, authn)
    retry = compile_retry(fields, timeout)
    rate_limit = compile_rate_limit(fields, shared_limits)
    fallback = compile_fallback(fields, split, clusters)
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
    name = fields.required("name", header_name)
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
        if name is None or not known_cluster(name, route.at("cluster"), route.problems, clusters):
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
        if name is not None and known_cluster(name, fields.at("cluster"), problems, clusters):
            first_use(name, fields.at("cluster"), entry_path, seen, problems, "cluster")
            if weight is not None:
                split.append(WeightedCluster(name, weight))
    if len(split) < len(entries):
        return None
    if split and sum(entry.weight for entry in split) == 0:
        problems.add(path, "weights sum to 0")
        return None
    return tuple(split) or None


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


def _default_auth(authn: bool, authz: bool) -> AuthMode:
    """Routes are protected unless they opt out: a token is required once authn is set, and authz alone still
    decides every route (with a null principal). Only with neither section does nothing run."""
    if authn:
        return "required"
    return "optional" if authz else "none"


def _auth(route: Fields, default: AuthMode, authn: bool) -> AuthMode:
    mode = route.get("auth", choice(AUTH_MODES, "mode"), default)
    if mode == "required" and not authn:
        # Served without a token check, "required" would be fail-open.
        route.problems.add(route.at("auth"), '"required" needs an authn section')
    return mode
