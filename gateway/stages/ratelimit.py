"""Rate limit: a token bucket per route and key; over the limit -> 429 ``rate_limited`` with ``Retry-After``.

Runs after routing (the limit is per route) and before authorization, so a flood never reaches the policy engine.
Keys: ``client`` (the peer address), ``header:<name>`` (requests without the header share one bucket), ``route``
(one bucket for the route), ``principal`` (the verified token's ``sub``; the client address for requests without one). A
``shared`` limit is counted in Redis across every gateway replica; when Redis cannot answer in time, the local
bucket decides (each replica then admits up to the full rate on its own) and the fallback is counted.
Buckets are runtime state: they survive reloads as long as the route keeps the same limit.
"""

from __future__ import annotations

import asyncio
import math

from aiohttp import web

from gateway.config.snapshot import RateLimit, RateLimitService
from gateway.context import RequestContext
from gateway.errors import RateLimited
from gateway.pipeline import Handler
from gateway.resilience.redis_limiter import RedisLimiter
from gateway.resilience.token_bucket import BucketTable
from telemetry.metrics import Metrics

__all__ = ["RateLimitStage"]

# Requests without the keyed header share this bucket, rather than escaping the limit.
_MISSING = "-"


class RateLimitStage:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._tables: dict[str, tuple[RateLimit, BucketTable]] = {}
        self._redis: tuple[RateLimitService, RedisLimiter] | None = None
        self._retired: list[RedisLimiter] = []  # replaced by a reload; closed at shutdown

    async def __call__(self, ctx: RequestContext, next: Handler) -> web.StreamResponse:
        route = ctx.route
        assert route is not None  # runs after routing
        limit = route.rate_limit
        if limit is None:
            return await next(ctx)
        key = self._key(ctx, limit)
        wait: float | None = None
        service = ctx.serving.snapshot.rate_limit_service
        if limit.shared and service is not None:
            wait = await self._limiter(service).take(f"{route.name}:{key}", limit.rps, limit.burst)
            if wait is None:
                self._metrics.ratelimit_fallbacks.labels(route.name).inc()
        if wait is None:
            wait = self._table(route.name, limit).take(key, asyncio.get_running_loop().time())
        if wait > 0:
            self._metrics.ratelimit_rejections.labels(route.name).inc()
            ctx.span.event("ratelimit.rejected", {"meshgate.ratelimit.key": limit.key, "meshgate.retry_after_s": wait})
            raise RateLimited(
                f'rate limit of route "{route.name}" exceeded ({limit.rps:g} requests/s, burst {limit.burst})',
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        return await next(ctx)

    @staticmethod
    def _key(ctx: RequestContext, limit: RateLimit) -> str:
        if limit.key == "header":
            return ctx.request.headers.get(limit.header, _MISSING)
        if limit.key == "route":
            return ""
        if limit.key == "principal":
            principal = ctx.principal
            subject = principal.get("sub") if principal is not None else None
            if isinstance(subject, str):
                # Prefixed: a subject can never share a bucket with a client address that looks the same.
                return "sub:" + subject
        return ctx.client_ip  # "client", and "principal" for a request without a verified token

    def _table(self, route: str, limit: RateLimit) -> BucketTable:
        entry = self._tables.get(route)
        if entry is None or entry[0] != limit:
            entry = self._tables[route] = (limit, BucketTable(limit.rps, limit.burst))
        return entry[1]

    def _limiter(self, service: RateLimitService) -> RedisLimiter:
        if self._redis is None or self._redis[0] != service:
            if self._redis is not None:
                self._retired.append(self._redis[1])  # requests in flight may still be using it
            self._redis = (service, RedisLimiter(service.redis, service.timeout, service.prefix))
        return self._redis[1]

    async def close(self) -> None:
        if self._redis is not None:
            self._retired.append(self._redis[1])
            self._redis = None
        for limiter in self._retired:
            await limiter.close()
        self._retired.clear()
