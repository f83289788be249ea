"""The policy input document: opa-envoy-plugin's shape plus meshgate's own ``meshgate`` object (CONTRACT 5).

Pure. The gateway hands over what it already knows (the normalized path, the raw query, the headers, addresses, the
verified claims); this module lays it out the way opa-envoy-plugin does, so an Envoy policy ports unchanged:
``parsed_path`` is the decoded path split on ``/`` and ``parsed_query`` maps each name to its list of values, as Go's
``url.ParseQuery`` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qs, unquote

__all__ = ["RequestFacts", "build_input", "parse_path", "parse_query"]


class RequestFacts:
    """What the gateway knows about one request, in the form the input needs. A plain holder, built per request."""

    __slots__ = (
        "destination",
        "headers",
        "host",
        "method",
        "path",
        "peer",
        "principal",
        "protocol",
        "query",
        "request_id",
        "route",
        "scheme",
        "service",
        "source",
    )

    def __init__(
        self,
        *,
        method: str,
        path: str,
        query: str,
        host: str,
        scheme: str,
        protocol: str,
        headers: Iterable[tuple[str, str]],
        request_id: str,
        source: tuple[str, int],
        destination: tuple[str, int],
        service: str,
        route: str,
        principal: Mapping[str, Any] | None,
        peer: str = "",
    ) -> None:
        self.method = method
        self.path = path  # normalized, still percent-encoded where it must be
        self.query = query  # raw, without "?"
        self.host = host
        self.scheme = scheme
        self.protocol = protocol
        self.headers = headers
        self.request_id = request_id
        self.source = source
        self.destination = destination
        self.service = service
        self.route = route
        self.principal = principal
        self.peer = peer  # the verified mesh identity of the caller ("" when none)


def build_input(facts: RequestFacts) -> dict[str, Any]:
    headers: dict[str, str] = {}
    for name, value in facts.headers:
        key = name.lower()
        # Repeated headers are joined with "," as Envoy does; policies see one string per name.
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    path = f"{facts.path}?{facts.query}" if facts.query else facts.path
    source = _address(facts.source)
    if facts.peer:
        # As opa-envoy-plugin gives it: Envoy's peer principal (the certificate's URI SAN), a string, and absent
        # (protobuf's JSON leaves empty fields out) when the caller proved no identity.
        source["principal"] = facts.peer
    return {
        "attributes": {
            "source": source,
            "destination": _address(facts.destination),
            "request": {
                "http": {
                    "id": facts.request_id,
                    "method": facts.method,
                    "path": path,
                    "host": facts.host,
                    "scheme": facts.scheme,
                    "protocol": facts.protocol,
                    "headers": headers,
                }
            },
        },
        "parsed_path": parse_path(facts.path),
        "parsed_query": parse_query(facts.query),
        "parsed_body": None,
        "meshgate": {
            "service": facts.service,
            "route": facts.route,
            "principal": dict(facts.principal) if facts.principal is not None else None,
        },
    }


def _address(pair: tuple[str, int]) -> dict[str, Any]:
    return {"address": {"socketAddress": {"address": pair[0], "portValue": pair[1]}}}


def parse_path(path: str) -> list[str]:
    """``/orders/a%20b/`` -> ``["orders", "a b", ""]``: opa-envoy-plugin trims the leading slash and splits."""
    return [unquote(segment) for segment in path.lstrip("/").split("/")]


def parse_query(query: str) -> dict[str, list[str]]:
    """``a=1&a=2&b`` -> ``{"a": ["1", "2"], "b": [""]}``; "&" is the only separator, as in Go since 1.17."""
    if not query:
        return {}
    return parse_qs(query, keep_blank_values=True, separator="&")
