"""Authn: verify the request's bearer JWT -> ``ctx.principal``, or 401 ``unauthenticated`` with ``WWW-Authenticate``.

After routing (``auth`` is per route) and before the rate limit (which may key on the principal) and authz (which
decides on it). ``auth: required`` needs a valid token; ``optional`` admits a request without one, but a token that
is present must be valid, as Envoy's ``allow_missing`` does: a bad token is never quietly treated as none.
Client-sent copies of the headers that carry forwarded claims are removed from every request, so an upstream can
trust them. Failures are counted by reason; the token itself is never logged.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from gateway.context import RequestContext
from gateway.errors import Unauthenticated
from gateway.pipeline import Handler
from gateway.policy_runtime import AuthnRuntime
from policy import jwt
from telemetry.metrics import Metrics

__all__ = ["AuthnStage"]

_MISSING_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="meshgate"'}


class AuthnStage:
    def __init__(self, metrics: Metrics) -> None:
        self._failures = metrics.authn_failures

    async def __call__(self, ctx: RequestContext, next: Handler) -> web.StreamResponse:
        authn = ctx.serving.policy.authn
        if authn is None:
            return await next(ctx)
        ctx.request_remove = authn.claim_headers
        route = ctx.route
        assert route is not None  # runs after routing
        if route.auth == "none":
            return await next(ctx)
        try:
            token = jwt.bearer_token(_one_authorization(ctx))
            if token is None:
                if route.auth == "optional":
                    return await next(ctx)
                raise jwt.Unauthenticated("missing_token")
            claims = await _verify(authn, token)
        except jwt.Unauthenticated as failure:
            self._failures.labels(failure.reason).inc()
            ctx.span.event("authn.failed", {"meshgate.authn.reason": failure.reason})
            raise _reply(failure) from None
        ctx.principal = claims
        if authn.settings.forward_claims:
            ctx.request_add = _claim_headers(claims, authn.settings.forward_claims)
        return await next(ctx)


async def _verify(authn: AuthnRuntime, token: str) -> dict[str, Any]:
    """The token's claims: from the verified-token cache when it holds this token for the current keys (the time
    claims are checked again), else by a full verification, remembered for next time."""
    rule, now = authn.settings.rule, time.time()
    cached = authn.tokens.kid_of(token)
    if cached is not None:
        claims = authn.tokens.claims(token, await authn.keys.keys(cached[0]), rule, now)
        if claims is not None:
            return claims
    kid = jwt.token_kid(token, rule)  # structure and algorithm first: junk never triggers a JWKS refetch
    keys = await authn.keys.keys(kid)
    claims = jwt.verify(token, keys, rule, now)
    authn.tokens.remember(token, kid, keys, claims)
    return claims


def _one_authorization(ctx: RequestContext) -> str | None:
    values = ctx.request.headers.getall("Authorization", ())
    if len(values) > 1:
        # Which one would the upstream (or another proxy) read? Ambiguity is refused, never guessed.
        raise jwt.Unauthenticated("malformed", "more than one Authorization header")
    return values[0] if values else None


def _reply(failure: jwt.Unauthenticated) -> Unauthenticated:
    if failure.reason == "missing_token":
        # RFC 6750 3.1: a request without credentials gets the bare challenge, no error code.
        return Unauthenticated("a bearer token is required", headers=_MISSING_CHALLENGE)
    challenge = f'Bearer realm="meshgate", error="invalid_token", error_description="{failure.description}"'
    return Unauthenticated(f"invalid bearer token: {failure.description}", headers={"WWW-Authenticate": challenge})


def _claim_headers(claims: dict[str, Any], forward: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    for claim, header in forward:
        value = claims.get(claim)
        if value is None:
            continue
        if isinstance(value, list):
            # Roles and scopes arrive as lists: one comma-separated header, as repeated headers would be joined.
            text = ",".join(item if isinstance(item, str) else json.dumps(item) for item in value)
        elif isinstance(value, str):
            text = value
        else:
            text = json.dumps(value, separators=(",", ":"))  # numbers, booleans and objects as JSON, not Python repr
        if "\r" not in text and "\n" not in text:
            pairs.append((header, text))
    return tuple(pairs)
