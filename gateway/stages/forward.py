"""Forward: the terminal handler. Pick a cluster and an endpoint, send the request, stream the response back.

Bodies stream both ways and are never buffered whole: the client's body is handed to the upstream client as an
async iterator (counted against ``limits.max_body_size`` as it goes) and the upstream's body is written to the
client chunk by chunk with backpressure. The route deadline bounds the time to the upstream's response headers;
once headers are sent to the client, a failure can only abort the connection, never become a local reply.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.config.snapshot import HashOn
from gateway.context import RequestContext
from gateway.errors import (
    BadRequest,
    GatewayError,
    NoHealthyUpstream,
    PayloadTooLarge,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.headers import downstream_response_headers, upstream_request_headers
from gateway.routing import pick_cluster, rewrite_path
from gateway.upstream.clusters import ClusterRuntime
from gateway.upstream.state import Endpoint
from gateway.upstream.websocket import is_websocket_upgrade, proxy_websocket
from telemetry.metrics import Metrics

__all__ = ["Forward"]

log = structlog.get_logger("meshgate.gateway")

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Forward:
    def __init__(self, metrics: Metrics, rng: random.Random) -> None:
        self._client_duration = metrics.client_duration
        self._rng = rng

    async def __call__(self, ctx: RequestContext) -> web.StreamResponse:
        route = ctx.route
        assert route is not None  # the route stage ran
        name = route.split[0].cluster if len(route.split) == 1 else pick_cluster(route, self._rng.random())
        ctx.cluster = name
        runtime = ctx.serving.clusters[name]
        loop = asyncio.get_running_loop()
        endpoint = runtime.balancer.pick(_hash_key(ctx, runtime.spec.hash_on), loop.time())
        if endpoint is None:
            raise NoHealthyUpstream(f'cluster "{name}" has no available endpoint')
        ctx.endpoint = endpoint.key
        ctx.attempts += 1
        request = ctx.request
        headers = upstream_request_headers(
            request.headers,
            client_ip=ctx.client_ip,
            scheme=ctx.scheme,
            request_id=ctx.request_id,
            host_override=route.rewrite.host if route.rewrite is not None else None,
        )
        path = rewrite_path(route, ctx.path)
        address = endpoint.address
        url = URL.build(
            scheme="http",
            host=address.host,
            port=address.port,
            path=path,
            query_string=ctx.query,
            encoded=True,
        )
        if is_websocket_upgrade(request):
            return await proxy_websocket(ctx, runtime.session, url, headers)
        return await self._exchange(ctx, runtime, endpoint, url, headers)

    async def _exchange(
        self,
        ctx: RequestContext,
        runtime: ClusterRuntime,
        endpoint: Endpoint,
        url: URL,
        headers: CIMultiDict[str],
    ) -> web.StreamResponse:
        request = ctx.request
        method = request.method
        loop = asyncio.get_running_loop()
        body = _stream_body(ctx) if request.body_exists else None
        started = loop.time()
        endpoint.start()
        try:
            async with asyncio.timeout_at(ctx.deadline):
                upstream = await runtime.session.request(
                    method, url, headers=headers, data=body, allow_redirects=False, compress=None
                )
        except TimeoutError:
            endpoint.abandon()
            self._observe_attempt(method, runtime.name, "", "timeout", loop.time() - started)
            raise UpstreamTimeout(f'upstream "{runtime.name}" did not answer within the route timeout') from None
        except aiohttp.ClientError as exc:
            # Abandon, not finish: a fast connection error must not make a broken endpoint look fast.
            endpoint.abandon()
            if ctx.body_error is not None:
                raise ctx.body_error from None
            kind = _error_type(exc)
            self._observe_attempt(method, runtime.name, "", kind, loop.time() - started)
            raise UpstreamUnavailable(f'upstream "{runtime.name}" failed: {kind}') from None
        except BaseException:  # cancelled (client went away)
            endpoint.abandon()
            raise
        rtt = loop.time() - started  # latency to response headers: what peak-EWMA compares endpoints by
        self._observe_attempt(method, runtime.name, str(upstream.status), "", rtt)
        try:
            return await _relay(ctx, upstream)
        finally:
            endpoint.finish(rtt, loop.time())
            upstream.release()

    def _observe_attempt(self, method: str, upstream: str, status: str, error: str, elapsed: float) -> None:
        self._client_duration.labels(method, upstream, status, error).observe(elapsed)


async def _stream_body(ctx: RequestContext) -> AsyncIterator[bytes]:
    """The client's body as chunks, with ``Expect: 100-continue`` answered and the size limit enforced."""
    request = ctx.request
    if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (1, 1):
        # Answer the expectation only when the body is actually wanted: a request refused earlier (401, 413, ...)
        # never sees 100 Continue, so the client does not send the body at all.
        await request.writer.write(_CONTINUE)
        request.writer.output_size = 0  # aiohttp does the same: the interim response is not the reply
    limit = ctx.serving.snapshot.limits.max_body_size
    received = 0
    try:
        async for chunk in request.content.iter_any():
            received += len(chunk)
            if limit is not None and received > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            yield chunk
    except GatewayError as error:
        ctx.body_error = error
        raise
    except (aiohttp.ClientPayloadError, aiohttp.http_exceptions.HttpProcessingError, ValueError) as exc:
        ctx.body_error = BadRequest(f"malformed request body: {exc}")
        raise


async def _relay(ctx: RequestContext, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """Send the upstream's status and headers, then stream its body with backpressure."""
    request = ctx.request
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(downstream_response_headers(upstream.headers))
    response.headers["x-request-id"] = ctx.request_id
    length = upstream.content_length
    if length is not None and "Transfer-Encoding" not in upstream.headers:
        response.content_length = length
    await response.prepare(request)
    ctx.status = upstream.status
    try:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        # Headers are gone already: the only honest signal left is to cut the connection, so the client sees a
        # truncated response rather than a short body that looks complete.
        log.warning("upstream_body_failed", upstream=ctx.cluster, endpoint=ctx.endpoint, error=type(exc).__name__)
        ctx.reason = "upstream_reset"
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("upstream body failed") from None
    await response.write_eof()
    return response


def _hash_key(ctx: RequestContext, hash_on: HashOn) -> str | None:
    if hash_on.kind == "client":
        return ctx.client_ip
    if hash_on.kind == "header":
        return ctx.request.headers.get(hash_on.name)
    return ctx.request.cookies.get(hash_on.name)


def _error_type(exc: aiohttp.ClientError) -> str:
    """Bounded error classes for the ``error_type`` label and the reply message."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect_failure"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return "reset"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "protocol_error"
    return "client_error"
