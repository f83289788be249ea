"""Send a response to the client: the upstream's (streamed) or a route's static fallback.

Once the status line is sent, a failure can only cut the connection, so the client sees a truncated response
rather than a short body that looks complete.
"""

from __future__ import annotations

import aiohttp
import structlog
from aiohttp import web

from gateway.config.snapshot import FallbackResponse
from gateway.context import RequestContext
from gateway.headers import downstream_response_headers

__all__ = ["relay", "static_response"]

log = structlog.get_logger("meshgate.gateway")


class _HeadersWithBody(web.StreamResponse):
    """A response whose headers go out with its first body bytes: one write instead of two for the common small
    response of known length (measured: -6 µs CPU a request). Streaming responses of unknown length keep aiohttp's
    default, headers at once, so a slow event stream still starts promptly."""

    _send_headers_immediately = False


async def relay(ctx: RequestContext, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """Send the upstream's status and headers, then stream its body with backpressure."""
    request = ctx.request
    length = upstream.content_length
    known_length = length is not None and "Transfer-Encoding" not in upstream.headers
    response_class = _HeadersWithBody if known_length else web.StreamResponse
    response = response_class(status=upstream.status, reason=upstream.reason)
    response.headers.extend(downstream_response_headers(upstream.headers))
    response.headers["x-request-id"] = ctx.request_id
    if ctx.decision_id:
        _add_decision_headers(ctx, response)
    if known_length:
        response.content_length = length
    await response.prepare(request)
    ctx.status = upstream.status
    try:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("upstream_body_failed", upstream=ctx.cluster, endpoint=ctx.endpoint, error=type(exc).__name__)
        ctx.reason = "upstream_reset"
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("upstream body failed") from None
    await response.write_eof()
    return response


def static_response(ctx: RequestContext, fallback: FallbackResponse) -> web.Response:
    response = web.Response(status=fallback.status, body=fallback.body)
    for name, value in fallback.headers:
        response.headers[name] = value
    response.headers["x-request-id"] = ctx.request_id
    if ctx.decision_id:
        _add_decision_headers(ctx, response)
    return response


def _add_decision_headers(ctx: RequestContext, response: web.StreamResponse) -> None:
    """CONTRACT 4: a response that passed a policy decision says which; the policy may add headers of its own."""
    response.headers["x-decision-id"] = ctx.decision_id
    for name, value in ctx.response_add:
        response.headers.add(name, value)
