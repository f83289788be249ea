"""Rescue: the one place a ``GatewayError`` becomes the contract's JSON local reply.

Anything unexpected becomes a 500 ``internal_error`` whose traceback goes to the log, never to the client.
Sits inside ``observe`` so every local reply is still measured and access-logged.
"""

from __future__ import annotations

import json

import structlog
from aiohttp import web

from gateway.context import RequestContext
from gateway.errors import GatewayError, PolicyDenied
from gateway.pipeline import Handler
from telemetry.metrics import Metrics

__all__ = ["Rescue", "local_reply"]

log = structlog.get_logger("meshgate.gateway")


class InternalError(GatewayError):
    status = 500
    code = "internal_error"


def local_reply(
    error: GatewayError, request_id: str, trace_id: str | None = None, decision_id: str = ""
) -> web.Response:
    """Render ``error`` as the contract's JSON body; ``x-request-id`` rides on every reply, ``x-decision-id`` on
    every reply after a policy decision. A deny whose policy gave a body of its own is answered with that body."""
    if isinstance(error, PolicyDenied) and error.body is not None:
        response = web.Response(status=error.status, text=error.body, headers=error.headers)
        if "Content-Type" not in error.headers:
            response.content_type = "text/plain"
    else:
        body: dict[str, object] = {
            "error": error.code,
            "message": error.message,
            "request_id": request_id,
            "trace_id": trace_id,
        }
        if decision_id:
            body["decision_id"] = decision_id
        if isinstance(error, PolicyDenied) and error.reason:
            body["reason"] = error.reason
        response = web.Response(
            status=error.status,
            body=json.dumps(body, separators=(",", ":")).encode(),
            content_type="application/json",
            headers=error.headers,
        )
    response.headers["x-request-id"] = request_id
    if decision_id:
        response.headers["x-decision-id"] = decision_id
    return response


class Rescue:
    def __init__(self, metrics: Metrics) -> None:
        self._replies = metrics.local_replies

    async def __call__(self, ctx: RequestContext, next: Handler) -> web.StreamResponse:
        try:
            return await next(ctx)
        except GatewayError as error:
            return self._reply(ctx, error)
        except ConnectionError:
            raise  # the client went away: nobody to reply to; observe records it as 499
        except Exception:
            # A bug, not a client problem: keep the traceback for operators, give the client a generic reply.
            log.exception("internal_error", path=ctx.path)
            return self._reply(ctx, InternalError("internal error"))

    def _reply(self, ctx: RequestContext, error: GatewayError) -> web.Response:
        ctx.reason = error.code
        route = ctx.route.name if ctx.route is not None else "unmatched"
        self._replies.labels(route, error.code).inc()
        response = local_reply(error, ctx.request_id, ctx.trace_id or None, ctx.decision_id)
        request = ctx.request
        if request.body_exists and not request.content.at_eof():
            # An unread body (413, or a refusal before 100-continue) would otherwise be read and thrown away
            # before the next request on this connection; closing is cheaper and cannot desynchronise framing.
            response.force_close()
        return response
