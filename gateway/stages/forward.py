"""Forward: the terminal handler. Cluster, admission, attempts with retries, fallback; then stream the answer.

Per request: pick the cluster (weighted split), pass the cluster's thresholds (max requests/pending, else 503
``circuit_open`` at once), then up to ``retry.attempts`` attempts, each on an endpoint the balancer picks among the
usable ones (healthy, not ejected, breaker admitting), preferring one the previous attempt did not fail on. Every
outcome feeds that endpoint's breaker and outlier detection. A retry needs a retryable outcome (``retry.on``), a
re-sendable body, an idempotent method (or the route's opt-in) unless nothing was sent, a token from the cluster's
retry budget, and time left before the route deadline for its backoff (full jitter, or the upstream's
``Retry-After``). When the cluster cannot answer, the route's fallback (cluster or static response) does.
"""

from __future__ import annotations

import asyncio
import random
import time

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.config.snapshot import HashOn, Route
from gateway.context import RequestContext
from gateway.errors import (
    CircuitOpen,
    GatewayError,
    NoHealthyUpstream,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.headers import upstream_request_headers
from gateway.resilience.backoff import full_jitter
from gateway.resilience.retry import method_retryable, retry_after_delay, retryable_failure, retryable_status
from gateway.routing import pick_cluster, rewrite_path
from gateway.upstream.attempt import send
from gateway.upstream.body import RequestBody
from gateway.upstream.clusters import ClusterRuntime
from gateway.upstream.relay import relay, static_response
from gateway.upstream.state import Endpoint
from gateway.upstream.websocket import is_websocket_upgrade, proxy_websocket
from telemetry.metrics import Metrics
from telemetry.propagation import B3_MULTI
from telemetry.tracing import Attributes, Span, Tracer

__all__ = ["Forward"]

# Failures after which nothing reached the upstream: re-sending is safe whatever the method.
_NOTHING_SENT = frozenset({"connect-failure", "refused"})
# Without a route timeout, the longest Retry-After (seconds) a retry waits for.
_MAX_RETRY_AFTER = 1.0
# Local replies a route's fallback answers instead.
_FALLBACK_CODES = frozenset({"no_healthy_upstream", "circuit_open", "upstream_unavailable", "upstream_timeout"})


class Forward:
    def __init__(self, metrics: Metrics, rng: random.Random, tracer: Tracer) -> None:
        self._metrics = metrics
        self._rng = rng
        self._tracer = tracer

    async def __call__(self, ctx: RequestContext) -> web.StreamResponse:
        route = ctx.route
        assert route is not None  # the route stage ran
        name = route.split[0].cluster if len(route.split) == 1 else pick_cluster(route, self._rng.random())
        fallback = route.fallback
        # One body for the route's cluster and its fallback cluster: the client's stream can be read only once.
        body = RequestBody(ctx) if ctx.request.body_exists else None
        try:
            return await self._to_cluster(ctx, route, name, body, exhausted_is_error=fallback is not None)
        except GatewayError as error:
            if fallback is None or error.code not in _FALLBACK_CODES or ctx.status:
                raise
            if fallback.cluster is not None and body is not None and not body.resendable:
                raise  # the failed cluster consumed a body too large to keep: the fallback cluster cannot get it
            ctx.reason = error.code  # why the fallback answered, for the access log
            ctx.span.event("fallback", {"meshgate.fallback.reason": error.code})
            if fallback.response is not None:
                self._metrics.fallbacks.labels(route.name, "response").inc()
                ctx.fallback = "response"
                return static_response(ctx, fallback.response)
            assert fallback.cluster is not None
            self._metrics.fallbacks.labels(route.name, "cluster").inc()
            ctx.fallback = "cluster"
            return await self._to_cluster(ctx, route, fallback.cluster, body, exhausted_is_error=False)

    async def _to_cluster(
        self, ctx: RequestContext, route: Route, name: str, body: RequestBody | None, *, exhausted_is_error: bool
    ) -> web.StreamResponse:
        ctx.cluster = name
        runtime = ctx.serving.clusters[name]
        refused = runtime.admission.try_enter(runtime.spec.max_connections)
        if refused is not None:
            raise CircuitOpen(f'cluster "{name}" is over its {refused} threshold')
        try:
            if is_websocket_upgrade(ctx.request):
                endpoint = self._pick(ctx, runtime, None)
                url = self._url(ctx, runtime, rewrite_path(route, ctx.path), endpoint)
                headers = self._headers(ctx)
                # The upstream continues the trace as a child of the SERVER span; the session itself is not a CLIENT
                # span (it may last for hours).
                headers.update(self._tracer.context_headers(ctx.span, ctx.parent))
                return await proxy_websocket(ctx, runtime.session, url, headers, runtime.server_hostname)
            return await self._attempts(ctx, route, runtime, body, exhausted_is_error)
        finally:
            runtime.admission.leave()

    async def _attempts(
        self,
        ctx: RequestContext,
        route: Route,
        runtime: ClusterRuntime,
        body: RequestBody | None,
        exhausted_is_error: bool,
    ) -> web.StreamResponse:
        request = ctx.request
        policy = route.retry
        loop = asyncio.get_running_loop()
        method = request.method
        may_resend = policy.attempts > 1 and method_retryable(policy, method)
        if body is not None and may_resend:
            await body.buffer_up_to(policy.max_replay_body)
        headers = self._headers(ctx)
        path = rewrite_path(route, ctx.path)  # once per request, not per attempt
        runtime.budget.record_request(loop.time())
        failed: Endpoint | None = None
        for attempt in range(policy.attempts):
            endpoint = self._pick(ctx, runtime, failed)
            now = loop.time()
            endpoint.breaker.on_attempt(now)
            endpoint.start()
            ctx.attempts += 1
            ctx.endpoint = endpoint.key
            # Each attempt is its own CLIENT span; the upstream continues the trace as its child.
            client = self._tracer.start_client(ctx.span)
            for name, value in self._tracer.context_headers(client, ctx.parent).items():
                headers[name] = value
            until = ctx.deadline
            if policy.per_try_timeout is not None:
                per_try = now + policy.per_try_timeout
                until = per_try if until is None else min(until, per_try)
            data = body.payload() if body is not None else None
            try:
                outcome = await send(
                    runtime.session,
                    method,
                    self._url(ctx, runtime, path, endpoint),
                    headers,
                    data,
                    until=until,
                    deadline=ctx.deadline,
                    server_hostname=runtime.server_hostname,
                    upstream=runtime.name,
                )
            except BaseException:  # cancelled: the client went away
                endpoint.abandon()
                endpoint.breaker.on_abandon(loop.time())
                self._observe(ctx, method, runtime.name, "", "cancelled", loop.time() - now, client)
                if client.recording:
                    self._end_client(client, method, runtime, endpoint, path, attempt, 0, "cancelled", ())
                raise
            elapsed = loop.time() - now
            last = attempt + 1 >= policy.attempts
            if isinstance(outcome, str):  # a failure kind
                endpoint.abandon()  # not finish(): a fast failure must not make a broken endpoint look fast
                changed = runtime.record(endpoint, True, loop.time())
                self._observe(ctx, method, runtime.name, "", outcome, elapsed, client)
                if client.recording:
                    self._end_client(client, method, runtime, endpoint, path, attempt, 0, outcome, changed)
                if ctx.body_error is not None:
                    raise ctx.body_error
                error = _failure_error(runtime.name, outcome)
                resend_ok = outcome in _NOTHING_SENT or may_resend
                if (
                    last
                    or outcome == "deadline"
                    or not retryable_failure(policy, outcome)
                    or not resend_ok
                    or (body is not None and not body.resendable)
                    or not await self._backoff(ctx, route, runtime, attempt, None, outcome)
                ):
                    raise error
                failed = endpoint
                continue
            status = outcome.status
            changed = runtime.record(endpoint, status >= 500, loop.time())
            self._observe(ctx, method, runtime.name, str(status), "", elapsed, client)
            if client.recording:
                error_type = str(status) if status >= 400 else ""
                self._end_client(client, method, runtime, endpoint, path, attempt, status, error_type, changed)
            if retryable_status(policy, status):  # the route counts this answer as a failed attempt
                try:
                    retry = (
                        not last
                        and may_resend
                        and (body is None or body.resendable)
                        and await self._backoff(
                            ctx,
                            route,
                            runtime,
                            attempt,
                            retry_after_delay(outcome.headers.get("Retry-After"), time.time()),
                            str(status),
                        )
                    )
                except BaseException:
                    # Bug fix: the client went away during the backoff. Without this the endpoint's in_flight
                    # stayed +1 for good (skewing least_request/peak_ewma and keeping a retired pool open, since
                    # _retire waits for in_flight == 0) and the upstream response was never released.
                    endpoint.finish(elapsed, loop.time())
                    outcome.release()
                    raise
                if retry or exhausted_is_error:
                    endpoint.finish(elapsed, loop.time())
                    outcome.release()
                    if not retry:  # out of attempts: the route's fallback answers instead of this failure
                        raise UpstreamUnavailable(f'upstream "{runtime.name}" answered {status}, retries exhausted')
                    failed = endpoint
                    continue
            try:
                return await relay(ctx, outcome)
            finally:
                endpoint.finish(elapsed, loop.time())
                outcome.release()
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _backoff(
        self,
        ctx: RequestContext,
        route: Route,
        runtime: ClusterRuntime,
        attempt: int,
        retry_after: float | None,
        reason: str,
    ) -> bool:
        """Wait before the next attempt if the budget and the deadline allow one; False = do not retry.

        ``reason`` is what failed (a failure kind or a status code), for the trace's ``retry`` event.
        """
        loop = asyncio.get_running_loop()
        policy = route.retry
        if retry_after is not None:
            if ctx.deadline is None and retry_after > _MAX_RETRY_AFTER:
                return False  # no deadline to bound it: do not park the request for an upstream's long pause
            delay = retry_after
        else:
            delay = full_jitter(attempt, policy.backoff_base, policy.backoff_max, self._rng)
        if ctx.deadline is not None and loop.time() + delay >= ctx.deadline:
            return False  # an upstream's Retry-After or our backoff would pass the deadline
        if not runtime.budget.try_withdraw(loop.time()):
            self._metrics.retry_budget_exhausted.labels(runtime.name).inc()
            ctx.span.event("retry.budget_exhausted", {"meshgate.retry.reason": reason})
            return False
        self._metrics.retries.labels(runtime.name).inc()
        ctx.span.event(
            "retry",
            {
                "http.request.resend_count": attempt + 1,
                "meshgate.retry.reason": reason,
                "meshgate.retry.backoff_ms": round(delay * 1000, 3),
            },
        )
        await asyncio.sleep(delay)
        return True

    def _pick(self, ctx: RequestContext, runtime: ClusterRuntime, avoid: Endpoint | None) -> Endpoint:
        now = asyncio.get_running_loop().time()
        endpoint = runtime.pick(_hash_key(ctx, runtime.spec.hash_on), now, avoid)
        if endpoint is not None:
            return endpoint
        if runtime.all_tripped(now):
            raise CircuitOpen(f'every endpoint of cluster "{runtime.name}" has a tripped circuit breaker')
        raise NoHealthyUpstream(f'cluster "{runtime.name}" has no available endpoint')

    @staticmethod
    def _url(ctx: RequestContext, runtime: ClusterRuntime, path: str, endpoint: Endpoint) -> URL:
        address = endpoint.address
        return URL.build(
            scheme=runtime.scheme,
            host=address.host,
            port=address.port,
            path=path,
            query_string=ctx.query,
            encoded=True,
        )

    def _headers(self, ctx: RequestContext) -> CIMultiDict[str]:
        route = ctx.route
        assert route is not None
        headers = upstream_request_headers(
            ctx.request.headers,
            client_ip=ctx.client_ip,
            scheme=ctx.scheme,
            request_id=ctx.request_id,
            host_override=route.rewrite.host if route.rewrite is not None else None,
        )
        # The client's context headers are replaced by ours on every attempt. Dropped first, so that none survives
        # next to them: a tracestate sent with an invalid (so ignored) traceparent, or a stale X-B3-ParentSpanId
        # next to our X-B3-SpanId, would describe another tree.
        stale: tuple[str, ...] = ("traceparent", "tracestate")
        if "b3" in self._tracer.propagators or "b3multi" in self._tracer.propagators:
            stale += ("b3", *B3_MULTI)
        for name in stale:
            headers.popall(name, None)
        # authn (forwarded claims, whose client-sent copies go first) and an allowing decision edit the request.
        for name in ctx.request_remove:
            headers.popall(name, None)
        for name, value in ctx.request_add:
            headers.add(name, value)
        return headers

    def _observe(
        self, ctx: RequestContext, method: str, upstream: str, status: str, error: str, elapsed: float, client: Span
    ) -> None:
        histogram = self._metrics.client_duration.labels(method, upstream, status, error)
        if client.recording and ctx.serving.snapshot.metrics.exemplars:
            histogram.observe(elapsed, {"trace_id": ctx.trace_id, "span_id": client.span_hex})
        else:
            histogram.observe(elapsed)

    def _end_client(
        self,
        span: Span,
        method: str,
        runtime: ClusterRuntime,
        endpoint: Endpoint,
        path: str,
        attempt: int,
        status: int,
        error_type: str,
        changed: tuple[str, ...],
    ) -> None:
        """End one attempt's CLIENT span, at the response headers (or the failure), like the client histogram."""
        address = endpoint.address
        attributes: Attributes = {
            "http.request.method": method,
            "server.address": address.host,
            "server.port": address.port,
            # Without the query string: it can carry tokens, and the convention asks for them to be redacted.
            "url.full": f"{runtime.scheme}://{endpoint.key}{path}",
            "meshgate.upstream": runtime.name,
        }
        if status:
            attributes["http.response.status_code"] = status
        if attempt:
            attributes["http.request.resend_count"] = attempt
        if error_type:
            attributes["error.type"] = error_type
            span.error = True  # a CLIENT span: any failure, 4xx included, is an error by the convention
        for event in changed:
            span.event(event, {"meshgate.endpoint": endpoint.key})
        self._tracer.end(span, method, attributes)


def _failure_error(cluster: str, kind: str) -> GatewayError:
    if kind in ("timeout", "deadline"):
        which = "the per-try timeout" if kind == "timeout" else "the route timeout"
        return UpstreamTimeout(f'upstream "{cluster}" did not answer within {which}')
    return UpstreamUnavailable(f'upstream "{cluster}" failed: {kind}')


def _hash_key(ctx: RequestContext, hash_on: HashOn) -> str | None:
    if hash_on.kind == "client":
        return ctx.client_ip
    if hash_on.kind == "header":
        return ctx.request.headers.get(hash_on.name)
    return ctx.request.cookies.get(hash_on.name)
