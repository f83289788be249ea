"""Route selection, prefix rewriting and weighted cluster choice: pure functions over a snapshot's routes.

``match`` walks the routes in order and returns the first whose every given condition holds:

- path: ``path`` is an exact comparison; ``path_prefix`` is a plain string prefix, as in Envoy, so ``/orders``
  matches ``/orders``, ``/orders/1`` *and* ``/ordersX`` (write ``/orders/`` plus an exact ``/orders`` route to stop
  at a segment boundary); ``path_regex`` must match the whole path (``fullmatch``). No path condition matches all.
  The path is the normalized one (``headers.normalize_path``) without the query string.
- methods: case-sensitive membership (RFC 9110 9.1: methods are case-sensitive; the route set is upper-case).
  ``HEAD`` does not implicitly match a ``GET`` route.
- host: compared case-insensitively without the port (``normalize_host``); ``*.example.com`` matches one or more
  labels in front (``a.example.com``, ``a.b.example.com``) but not ``example.com``; a lone ``*`` matches any host.
  A route with a host condition never matches a request without Host.
- headers: every ``HeaderMatch`` holds for the *first* value of its header (``headers.get(name)``).

Conditions are tested cheapest and most selective first (path, method, host, headers), and the request host is
normalized at most once per call, and only if a route that got that far asks for it.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from typing import Final

from gateway.config.snapshot import Route

__all__ = ["match", "normalize_host", "pick_cluster", "rewrite_path"]

_UNSET: Final = object()  # "request host not normalized yet" (None is a real value: no Host header)


def normalize_host(host: str) -> str:
    """``host`` lower-cased, without port, IPv6 brackets or a trailing dot.

    ``Example.COM:8080`` -> ``example.com``; ``[::1]:80`` -> ``::1`` (IPv6 unbracketed, as in ``Address``);
    ``example.com.`` -> ``example.com`` (the absolute form names the same host, and would otherwise slip past a
    host-specific route). A bare IPv6 address (several colons, no brackets) is kept whole.
    """
    h = host.lower()
    if h.startswith("["):
        end = h.find("]")
        return h[1:end] if end != -1 else h
    colon = h.find(":")
    if colon != -1 and colon == h.rfind(":"):  # exactly one colon: host:port
        h = h[:colon]
    if h.endswith("."):
        h = h[:-1]
    return h


def _host_matches(pattern: str, host: str) -> bool:
    if pattern[0] != "*":
        return host == pattern
    if len(pattern) == 1:
        return True  # "*": any host
    # "*.example.com": the suffix ".example.com" with at least one character before it.
    return len(host) >= len(pattern) and host.endswith(pattern[1:])


def match(
    routes: Sequence[Route],
    method: str,
    host: str | None,
    path: str,
    headers: Mapping[str, str],
) -> Route | None:
    """The first route in ``routes`` whose conditions all hold for the request, or ``None`` (the caller's 404)."""
    normalized_host: object = _UNSET
    for route in routes:
        m = route.match
        if m.path is not None:
            if path != m.path:
                continue
        elif m.path_prefix is not None:
            if not path.startswith(m.path_prefix):
                continue
        elif m.path_regex is not None and m.path_regex.fullmatch(path) is None:
            continue
        if m.methods is not None and method not in m.methods:
            continue
        if m.host is not None:
            if normalized_host is _UNSET:
                normalized_host = normalize_host(host) if host is not None else None
            if not isinstance(normalized_host, str) or not _host_matches(m.host, normalized_host):
                continue
        if m.headers:
            for header_match in m.headers:  # a plain loop: all(<genexpr>) would allocate a generator per route
                if not header_match.matches(headers.get(header_match.name)):
                    break
            else:
                return route
            continue
        return route
    return None


def rewrite_path(route: Route, path: str) -> str:
    """``path`` with the route's ``rewrite.prefix`` applied, or ``path`` itself when the route has none.

    The prefix replaces the part of the path the route matched: its ``path_prefix``; the whole path for an exact
    ``path`` or a ``path_regex`` (a full match also covers the whole path); nothing (an empty prefix) for a route
    without a path condition, which then gets the prefix prepended. Slashes at the seam are kept exactly once:

    - ``/orders`` -> ``/v2/orders``: ``/orders/1`` -> ``/v2/orders/1``, ``/ordersX`` -> ``/v2/ordersX``;
    - ``/orders`` -> ``/v2/orders/``: ``/orders/1`` -> ``/v2/orders/1`` (not ``//1``);
    - ``/orders/`` -> ``/v2``: ``/orders/1`` -> ``/v2/1`` (the matched prefix's trailing slash survives; Envoy
      would give ``/v21``), ``/orders/`` -> ``/v2/``;
    - ``/api`` -> ``/``: ``/api/x`` -> ``/x``, ``/api`` -> ``/``.
    """
    rewrite = route.rewrite
    if rewrite is None or rewrite.prefix is None:
        return path
    new_prefix = rewrite.prefix
    m = route.match
    if m.path is not None or m.path_regex is not None:
        return new_prefix or "/"
    matched = m.path_prefix or ""
    rest = path[len(matched) :]
    if matched.endswith("/") and not new_prefix.endswith("/"):
        new_prefix += "/"
    if new_prefix.endswith("/") and rest.startswith("/"):
        rest = rest[1:]
    result = new_prefix + rest
    # An empty rewrite prefix ("strip the prefix") could leave a relative path; the upstream needs an absolute one.
    return result if result.startswith("/") else "/" + result


def pick_cluster(route: Route, r: float) -> str:
    """The cluster of ``route.split`` chosen by ``r`` in ``[0, 1)`` (the caller passes ``rng.random()``).

    Entry ``i`` owns ``[cumulative[i-1], cumulative[i])`` of ``r * total_weight``; ``bisect_right`` skips
    zero-weight entries. The index is clamped so ``r`` rounding up to the total still picks the last cluster.
    """
    split = route.split
    if len(split) == 1:
        return split[0].cluster  # the common single-cluster route: no arithmetic
    weights = route.cumulative_weights
    index = bisect_right(weights, r * weights[-1])
    return split[min(index, len(split) - 1)].cluster
