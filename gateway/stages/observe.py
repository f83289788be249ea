"""Observe: the outermost stage. Trace context, request id, log context; then metrics, access log and the span.

Outermost so it sees every reply, local or proxied, and measures the whole request including body streaming. On
the way in it continues the client's trace (or starts one) and binds ``request_id``, ``trace_id`` and ``span_id`` to
the log context, so every line logged inside the request carries them. On the way out it records the latency
histogram (with the trace as exemplar when the request was sampled), writes the access log and ends the SERVER span;
all three carry the same trace id, which is what lets an SRE go from a Grafana exemplar to the Jaeger trace to the
log lines.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from aiohttp import web

from gateway.context import RequestContext
from gateway.headers import new_request_id, request_id_from
from gateway.pipeline import Handler
from telemetry.access_log import AccessLog
from telemetry.metrics import Metrics
from telemetry.tracing import Attributes, Tracer

__all__ = ["Observe"]

# nginx's convention for "the client went away before we answered".
CLIENT_CLOSED = 499


class Observe:
    def __init__(self, metrics: Metrics, access_log: AccessLog, tracer: Tracer) -> None:
        self._metrics = metrics
        self._access_log = access_log
        self._tracer = tracer

    async def __call__(self, ctx: RequestContext, next: Handler) -> web.StreamResponse:
        request = ctx.request
        ctx.request_id = request_id_from(request.headers, new_request_id)
        span, ctx.parent = self._tracer.start_server(request.headers, ctx.started)
        ctx.span = span
        ctx.trace_id = span.trace_hex
        # aiohttp runs every request of a keep-alive connection in the same task: clear, then bind.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=ctx.request_id, trace_id=ctx.trace_id, span_id=span.span_hex)
        try:
            response = await next(ctx)
            ctx.status = response.status
            return response
        except (asyncio.CancelledError, ConnectionError):
            if not ctx.status:
                ctx.status = CLIENT_CLOSED
            raise
        finally:
            self._record(ctx, time.perf_counter() - ctx.started)

    def _record(self, ctx: RequestContext, elapsed: float) -> None:
        route = ctx.route.name if ctx.route is not None else "unmatched"
        method = ctx.request.method
        span = ctx.span
        span_id = span.span_hex
        snapshot = ctx.serving.snapshot
        histogram = self._metrics.server_duration.labels(method, route, str(ctx.status))
        if span.recording and snapshot.metrics.exemplars:
            # Only sampled requests: an exemplar must point at a trace the backend actually has.
            histogram.observe(elapsed, {"trace_id": ctx.trace_id, "span_id": span_id})
        else:
            histogram.observe(elapsed)
        if snapshot.logs.access_log:
            self._access_log.emit(
                snapshot.service,
                {
                    "request_id": ctx.request_id,
                    "trace_id": ctx.trace_id,
                    "span_id": span_id,
                    "method": method,
                    "path": ctx.path or ctx.request.path,
                    "route": route,
                    "status": ctx.status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "upstream": ctx.cluster or None,
                    "endpoint": ctx.endpoint or None,
                    "attempts": ctx.attempts,
                    "client_address": ctx.client_ip,
                    "peer_identity": ctx.peer_identity or None,
                    "decision_id": ctx.decision_id or None,
                    "reason": ctx.reason or None,
                    "fallback": ctx.fallback or None,
                },
            )
        if span.recording:
            self._end_span(ctx, method)

    def _end_span(self, ctx: RequestContext, method: str) -> None:
        """The SERVER span's attributes, by the stable HTTP semantic conventions (built only for sampled requests)."""
        request = ctx.request
        status = ctx.status
        host, _, port = request.host.rpartition(":") if not request.host.endswith("]") else (request.host, "", "")
        if not host:
            host, port = port, ""
        attributes: Attributes = {
            "http.request.method": method,
            "url.path": ctx.path or request.path,
            "url.scheme": ctx.scheme,
            "http.response.status_code": status,
            "server.address": host,
            "client.address": ctx.client_ip,
            "network.protocol.version": f"{request.version.major}.{request.version.minor}",
            "meshgate.request_id": ctx.request_id,
            "meshgate.attempts": ctx.attempts,
        }
        if port.isdigit():
            attributes["server.port"] = int(port)
        user_agent = request.headers.get("User-Agent")
        if user_agent is not None:
            attributes["user_agent.original"] = user_agent
        name = method
        if ctx.route is not None:
            name = f"{method} {ctx.route.name}"
            attributes["http.route"] = attributes["meshgate.route"] = ctx.route.name
        if ctx.cluster:
            attributes["meshgate.upstream"] = ctx.cluster
        if ctx.peer_identity:
            attributes["meshgate.peer.identity"] = ctx.peer_identity
        if ctx.reason:
            attributes["meshgate.reason"] = ctx.reason
        if ctx.fallback:
            attributes["meshgate.fallback"] = ctx.fallback
        if ctx.decision_id:
            # Here too, not only on the authz child: Jaeger searches tags of any span, but a SERVER-span filter is
            # the common query.
            attributes["meshgate.authz.decision_id"] = ctx.decision_id
        if status >= 500 or ctx.reason == "upstream_reset":
            # The convention: a 5xx is an error on the server span (a 4xx is the client's, and not); so is an
            # upstream that broke off mid-body, though a 2xx status had gone out.
            attributes["error.type"] = ctx.reason or str(status)
            ctx.span.error = True
        self._tracer.end(ctx.span, name, attributes)
