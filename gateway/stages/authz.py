"""Authz: ask the policy about the request -> continue, or reply with the policy's deny (403 ``forbidden`` or its
own status, headers and body), or 503 ``policy_unavailable`` when no decision could be made (fail closed).

After the rate limit, so a flood never reaches the engine; after authn, whose principal the policy judges. Every
decision gets an id that appears in the ``x-decision-id`` header, the ``authz`` span, the access log, the decision
log and a deny's body. The decision path (engine plus cache) is pinned once, so a bundle reloaded mid-request never
mixes two policies. A shadow policy, when configured, is evaluated for every request in a task of its own and only
logged and counted: it can never change or delay the answer.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import structlog
from aiohttp import web
from multidict import CIMultiDict

from gateway.context import RequestContext
from gateway.errors import PolicyDenied, PolicyUnavailable
from gateway.pipeline import Handler
from gateway.policy_runtime import AuthzRuntime, DecisionPath
from policy.cache import key_of
from policy.decision import Decision, InvalidResult, parse_result
from policy.engine import UNDEFINED, PolicyError
from policy.input import RequestFacts, build_input
from telemetry.access_log import AccessLog
from telemetry.logging import REDACTED, secret_param
from telemetry.metrics import Metrics
from telemetry.tracing import Attributes, Tracer

__all__ = ["MAX_SHADOWS_IN_FLIGHT", "AuthzStage"]

log = structlog.get_logger("meshgate.policy")

# Shadow decisions in flight at once. An embedded shadow finishes within a loop turn, an OPA one within its timeout;
# a hung or slow OPA under load would otherwise pile up tasks (and their inputs) without limit. Past the bound a
# shadow decision is skipped and counted as `decision="skipped"`: the enforced path is never slowed for it.
MAX_SHADOWS_IN_FLIGHT = 1000


class AuthzStage:
    def __init__(self, metrics: Metrics, tracer: Tracer, decision_log: AccessLog) -> None:
        self._metrics = metrics
        self._tracer = tracer
        self._log = decision_log
        self._shadows: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks
        self._failing = False  # decisions are failing open (on_error: allow): logged once, not per request

    def _fail_open(self, decision_id: str, error: str) -> None:
        # Every such request is counted (decision="error") and has its decision log line; the warning says once
        # that the gateway is admitting requests without a decision, and policy_error_recovered when that ends.
        if not self._failing:
            self._failing = True
            log.warning("policy_error_allowed", decision_id=decision_id, error=error)

    async def __call__(self, ctx: RequestContext, next: Handler) -> web.StreamResponse:
        authz = ctx.serving.policy.authz
        route = ctx.route
        assert route is not None  # runs after routing
        if authz is None or route.auth == "none":
            return await next(ctx)
        path, shadow = authz.primary, authz.shadow  # pinned: a bundle reload swaps these attributes
        document = build_input(_facts(ctx))
        ctx.decision_id = decision_id = str(uuid.uuid4())
        span = self._tracer.start_internal(ctx.span)
        started = time.perf_counter()
        decision, raw, cache, error = await _decide(path, document)
        elapsed = time.perf_counter() - started
        outcome = "error" if decision is None else "allow" if decision.allowed else "deny"
        self._metrics.authz_decisions.labels(route.name, outcome, cache).inc()
        self._metrics.authz_duration.labels(path.engine.name).observe(elapsed)
        if shadow is not None:
            self._start_shadow(ctx, authz, shadow, document, decision_id, outcome)
        if authz.settings.decision_log:
            self._log_decision(ctx, path, document, decision_id, raw, outcome, cache, elapsed, error)
        if span.recording:
            self._end_span(span, path, decision_id, decision, cache, error)
        if decision is None:
            if authz.settings.on_error == "allow":
                self._fail_open(decision_id, error)
                return await next(ctx)
            # The cause (an OPA address, a policy file and line) stays in the span and the decision log, found by
            # the decision id: a client learns nothing about the gateway's internals from it.
            raise PolicyUnavailable("no policy decision could be made")
        if self._failing:
            self._failing = False
            log.info("policy_error_recovered", decision_id=decision_id)
        if not decision.allowed:
            self._metrics.authz_denials.inc(route.name, decision.reason or "")
            raise _deny(decision)
        if decision.request_headers_to_remove:
            ctx.request_remove = (*ctx.request_remove, *decision.request_headers_to_remove)
        if decision.headers:
            ctx.request_add = (*ctx.request_add, *decision.headers)
        ctx.response_add = decision.response_headers_to_add
        return await next(ctx)

    def _start_shadow(
        self,
        ctx: RequestContext,
        authz: AuthzRuntime,
        shadow: DecisionPath,
        document: dict[str, Any],
        decision_id: str,
        enforced: str,
    ) -> None:
        route = ctx.route.name if ctx.route is not None else "unmatched"
        if len(self._shadows) >= MAX_SHADOWS_IN_FLIGHT:
            self._metrics.authz_shadow_decisions.labels(route, "skipped").inc()
            return
        fields = {"request_id": ctx.request_id, "trace_id": ctx.trace_id, "span_id": ctx.span.span_hex}
        service = ctx.serving.snapshot.service
        task = asyncio.create_task(self._shadow(authz, shadow, document, decision_id, enforced, route, fields, service))
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    async def _shadow(
        self,
        authz: AuthzRuntime,
        shadow: DecisionPath,
        document: dict[str, Any],
        decision_id: str,
        enforced: str,
        route: str,
        fields: dict[str, Any],
        service: str,
    ) -> None:
        started = time.perf_counter()
        decision, raw, cache, error = await _decide(shadow, document)
        elapsed = time.perf_counter() - started
        outcome = "error" if decision is None else "allow" if decision.allowed else "deny"
        self._metrics.authz_shadow_decisions.labels(route, outcome).inc()
        if outcome != enforced:
            self._metrics.authz_shadow_disagreements.labels(route).inc()
        if authz.settings.decision_log:
            fields["shadow"] = True
            fields["enforced"] = enforced
            self._write(service, fields, shadow, document, decision_id, raw, outcome, cache, elapsed, error)

    def _log_decision(
        self,
        ctx: RequestContext,
        path: DecisionPath,
        document: dict[str, Any],
        decision_id: str,
        raw: object,
        outcome: str,
        cache: str,
        elapsed: float,
        error: str,
    ) -> None:
        fields = {"request_id": ctx.request_id, "trace_id": ctx.trace_id, "span_id": ctx.span.span_hex}
        service = ctx.serving.snapshot.service
        self._write(service, fields, path, document, decision_id, raw, outcome, cache, elapsed, error)

    def _write(
        self,
        service: str,
        fields: dict[str, Any],
        path: DecisionPath,
        document: dict[str, Any],
        decision_id: str,
        raw: object,
        outcome: str,
        cache: str,
        elapsed: float,
        error: str,
    ) -> None:
        fields["decision_id"] = decision_id
        fields["decision"] = path.settings.decision
        fields["result"] = None if raw is UNDEFINED else raw
        fields["outcome"] = outcome
        fields["engine"] = path.engine.name
        fields["bundle_revision"] = path.engine.revision or None
        fields["cache"] = cache
        fields["eval_ms"] = round(elapsed * 1000, 3)
        fields["input"] = _loggable(document)
        if error:
            fields["error"] = error
        self._log.decision(service, fields)

    def _end_span(
        self, span: Any, path: DecisionPath, decision_id: str, decision: Decision | None, cache: str, error: str
    ) -> None:
        attributes: Attributes = {
            "meshgate.authz.decision_id": decision_id,
            "meshgate.authz.allowed": decision is not None and decision.allowed,
            "meshgate.authz.cache": cache,
            "meshgate.authz.engine": path.engine.name,
            "meshgate.authz.decision": path.settings.decision,
        }
        if path.engine.revision:
            attributes["meshgate.authz.revision"] = path.engine.revision
        if decision is not None and decision.reason:
            attributes["meshgate.authz.reason"] = decision.reason
        if error:
            attributes["error.type"] = "policy_error"
            attributes["meshgate.authz.error"] = error
            span.error = True
        self._tracer.end(span, "authz", attributes)


async def _decide(path: DecisionPath, document: dict[str, Any]) -> tuple[Decision | None, object, str, str]:
    """(decision or None on error, the raw value, cache use, error text)."""
    cache = path.cache
    key = ""
    if cache is not None:
        # The revision is part of the key as well as of the cache's lifetime: belt and braces.
        key = path.engine.revision + "\n" + key_of(document, path.key_paths)
        hit = cache.get(key, time.monotonic())
        if hit is not None:
            return hit[0], hit[1], "hit", ""
    try:
        raw = await path.engine.evaluate(document)
        decision = parse_result(raw)
    except PolicyError as exc:
        return None, UNDEFINED, "miss" if cache is not None else "none", str(exc)
    except InvalidResult as exc:
        return None, UNDEFINED, "miss" if cache is not None else "none", f"invalid policy result: {exc}"
    if cache is not None:
        cache.put(key, (decision, raw), time.monotonic())
        return decision, raw, "miss", ""
    return decision, raw, "none", ""


def _loggable(document: dict[str, Any]) -> dict[str, Any]:
    """The input as the decision log shows it: the log's redaction masks secret query parameters inside the path,
    but in ``parsed_query`` they are plain keys (``code``, ``sig``, ``jwt``...) that it would let through."""
    query = document.get("parsed_query")
    if not query or not any(secret_param(name) for name in query):
        return document
    masked = {name: [REDACTED] if secret_param(name) else values for name, values in query.items()}
    return {**document, "parsed_query": masked}


def _deny(decision: Decision) -> PolicyDenied:
    headers: CIMultiDict[str] | None = None
    if decision.headers:
        headers = CIMultiDict(decision.headers)
    reason = decision.reason
    return PolicyDenied(
        reason or "denied by policy", reason=reason, status=decision.status, headers=headers, body=decision.body
    )


def _facts(ctx: RequestContext) -> RequestFacts:
    request = ctx.request
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    destination = (str(sockname[0]), int(sockname[1])) if isinstance(sockname, tuple) else ("", 0)
    route = ctx.route
    return RequestFacts(
        method=request.method,
        path=ctx.path,
        query=ctx.query,
        host=request.host,
        scheme=ctx.scheme,
        protocol=f"HTTP/{request.version.major}.{request.version.minor}",
        headers=_policy_headers(ctx),
        request_id=ctx.request_id,
        source=(ctx.client_ip, ctx.client_port),
        destination=destination,
        service=ctx.serving.snapshot.service,
        route=route.name if route is not None else "",
        principal=ctx.principal,
        peer=ctx.peer_identity,
    )


def _policy_headers(ctx: RequestContext) -> list[tuple[str, str]]:
    """The headers the policy sees: the client's, minus the claim headers a client may not set, with the request
    id the upstream will get (as Envoy's ext_authz does)."""
    skip = {*ctx.request_remove, "x-request-id"}
    headers = [(name, value) for name, value in ctx.request.headers.items() if name.lower() not in skip]
    headers.append(("x-request-id", ctx.request_id))
    headers.extend(ctx.request_add)
    return headers
