"""Observe: the outermost stage. Request id, log context, metrics and the access log for every request.

Outermost so it sees every reply, local or proxied, and measures the whole request including body streaming.
(Tracing joins here when the tracing module lands.)
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

__all__ = ["Observe"]

# nginx's convention for "the client went away before we answered".
CLIENT_CLOSED = 499


class Observe:
    def __init__(self, metrics: Metrics, access_log: AccessLog) -> None:
        self._metrics = metrics
        self._access_log = access_log

    async def __call__(self, ctx: RequestContext, next: Handler) -> web.StreamResponse:
        request = ctx.request
        ctx.request_id = request_id_from(request.headers, new_request_id)
        # aiohttp runs every request of a keep-alive connection in the same task: clear, then bind.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=ctx.request_id)
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
        self._metrics.server_duration.labels(method, route, str(ctx.status)).observe(elapsed)
        snapshot = ctx.serving.snapshot
        if snapshot.logs.access_log:
            self._access_log.emit(
                snapshot.service,
                {
                    "request_id": ctx.request_id,
                    "method": method,
                    "path": ctx.path or ctx.request.path,
                    "route": route,
                    "status": ctx.status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "upstream": ctx.cluster or None,
                    "endpoint": ctx.endpoint or None,
                    "attempts": ctx.attempts,
                    "client_address": ctx.client_ip,
                    "decision_id": None,
                    "reason": ctx.reason or None,
                    "fallback": ctx.fallback or None,
                },
            )
