"""Route: normalize the path, pick the route (first match wins), and apply request-level limits.

Normalization happens before matching (and before policy) so ``/public/../admin`` is routed as ``/admin``.
A declared ``Content-Length`` over the body limit is refused here, before any upstream work; a chunked body is
counted while it streams (see ``forward``). The route's deadline starts now.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.context import RequestContext
from gateway.errors import PayloadTooLarge, RouteNotFound
from gateway.headers import normalize_path
from gateway.pipeline import Handler
from gateway.routing import match

__all__ = ["RouteStage"]


class RouteStage:
    async def __call__(self, ctx: RequestContext, next: Handler) -> web.StreamResponse:
        snapshot = ctx.serving.snapshot
        request = ctx.request
        raw = request.raw_path
        if raw[:1] != "/" and "://" in raw:
            # Absolute-form request target (``GET http://host/x``): use its path and query, like origin-form.
            rel = request.rel_url
            raw = rel.raw_path + ("?" + rel.raw_query_string if rel.raw_query_string else "")
        query = raw.find("?")
        if query < 0:
            ctx.path = normalize_path(raw, snapshot.limits.escaped_slashes)
        else:
            ctx.path = normalize_path(raw[:query], snapshot.limits.escaped_slashes)
            ctx.query = raw[query + 1 :]
        route = match(snapshot.routes, request.method, request.headers.get("Host"), ctx.path, request.headers)
        if route is None:
            raise RouteNotFound(f"no route for {request.method} {ctx.path}")
        ctx.route = route
        limit = snapshot.limits.max_body_size
        length = request.content_length
        if limit is not None and length is not None and length > limit:
            raise PayloadTooLarge(f"request body of {length} bytes exceeds the limit of {limit} bytes")
        if route.timeout is not None:
            ctx.deadline = asyncio.get_running_loop().time() + route.timeout
        return await next(ctx)
