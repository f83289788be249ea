"""Typed local replies: every response the gateway makes itself is one of these, rendered once in `rescue`.

A stage that refuses a request raises a ``GatewayError``; the ``rescue`` stage turns it into the contract's JSON
body ``{"error", "message", "request_id", "trace_id"}`` with the status it carries. ``code`` is also the bounded
``reason`` label of ``meshgate_local_replies_total``.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "BadRequest",
    "CircuitOpen",
    "GatewayError",
    "NoHealthyUpstream",
    "NotReady",
    "PayloadTooLarge",
    "PolicyDenied",
    "PolicyUnavailable",
    "RateLimited",
    "RouteNotFound",
    "Unauthenticated",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class GatewayError(Exception):
    """A local reply: HTTP ``status``, contract ``code`` and a human ``message``."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers: Mapping[str, str] = headers or {}


class BadRequest(GatewayError):
    status = 400
    code = "bad_request"


class RouteNotFound(GatewayError):
    status = 404
    code = "route_not_found"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload_too_large"


class UpstreamUnavailable(GatewayError):
    status = 502
    code = "upstream_unavailable"


class NoHealthyUpstream(GatewayError):
    status = 503
    code = "no_healthy_upstream"


class NotReady(GatewayError):
    """No config is serving yet (a gateway started from a bootstrap file, waiting for its config service)."""

    status = 503
    code = "not_ready"


class UpstreamTimeout(GatewayError):
    status = 504
    code = "upstream_timeout"


class CircuitOpen(GatewayError):
    status = 503
    code = "circuit_open"


class RateLimited(GatewayError):
    status = 429
    code = "rate_limited"


class Unauthenticated(GatewayError):
    status = 401
    code = "unauthenticated"


class PolicyUnavailable(GatewayError):
    status = 503
    code = "policy_unavailable"


class PolicyDenied(GatewayError):
    """A deny. The policy may set the status, extra reply headers, and a body of its own that replaces the JSON."""

    code = "forbidden"

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        status: int = 403,
        headers: Mapping[str, str] | None = None,
        body: str | None = None,
    ) -> None:
        super().__init__(message, headers=headers)
        self.reason = reason  # the policy's own reason, "" when it gave none
        self.status = status
        self.body = body
