"""RequestContext: the per-request state every stage reads and fills in.

One slotted object per request, created by ``server.py``. It pins the serving state (config snapshot plus the
upstream runtimes built for it) for the whole request, so a reload mid-request never mixes two configs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aiohttp.web import BaseRequest

from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.config.snapshot import Route
    from gateway.serving import Serving
    from telemetry.propagation import Parent
    from telemetry.tracing import Span

__all__ = ["RequestContext"]


class RequestContext:
    __slots__ = (
        "attempts",
        "body_error",
        "client_ip",
        "client_port",
        "cluster",
        "deadline",
        "decision_id",
        "endpoint",
        "fallback",
        "parent",
        "path",
        "peer_identity",
        "principal",
        "query",
        "reason",
        "request",
        "request_add",
        "request_id",
        "request_remove",
        "response_add",
        "route",
        "scheme",
        "serving",
        "span",
        "started",
        "status",
        "trace_id",
    )

    def __init__(self, request: BaseRequest, serving: Serving, started: float) -> None:
        self.request = request
        self.serving = serving
        self.started = started  # time.perf_counter() at accept; loop.time() may tick in whole milliseconds
        self.request_id = ""
        # Set by observe, first thing: the request's SERVER span (ids always; recorded only when sampled), the
        # client's trace context it continues (None for a new trace), and the trace id as 32 hex digits.
        self.span: Span
        self.parent: Parent | None = None
        self.trace_id = ""
        self.client_ip = ""
        self.client_port = 0
        self.scheme = "http"
        # The caller's mesh identity (spiffe://...): the URI SAN of a client certificate the mesh CAs verified on a
        # mesh listener; "" otherwise. Set at accept, for the policy input, the span and the access log.
        self.peer_identity = ""
        self.path = ""  # normalized path: what routing, policy and the upstream see
        self.query = ""  # raw (still percent-encoded) query string, forwarded as received
        self.route: Route | None = None
        self.cluster = ""  # the cluster picked for this request ("" before forwarding)
        self.endpoint = ""  # "host:port" of the last attempt
        self.attempts = 0
        self.fallback = ""  # "response" | "cluster" when the route's fallback answered
        self.deadline: float | None = None  # loop.time() by which upstream response headers must arrive
        self.status = 0  # final status sent to the client
        self.reason = ""  # local reply code, "" when the upstream answered
        # Set by authn: the verified JWT claims (None: no token, or the route skips authn).
        self.principal: Mapping[str, Any] | None = None
        # Set by authz: the decision's id ("" when none was made), and what the decision (and authn's forwarded
        # claims) change: header names removed from and headers added to the upstream request, headers added to
        # the client's response. Empty tuples are shared; the common request allocates nothing here.
        self.decision_id = ""
        self.request_remove: tuple[str, ...] = ()
        self.request_add: tuple[tuple[str, str], ...] = ()
        self.response_add: tuple[tuple[str, str], ...] = ()
        # Set when reading the client's body failed inside the upstream client's writer task (which would
        # otherwise surface it as a generic connection error): the real cause, to reply with.
        self.body_error: GatewayError | None = None
