"""WebSocket pass-through: the upgrade is accepted only once the upstream accepted it, then frames are relayed.

The upstream handshake runs first so a refusing or unreachable upstream becomes an ordinary local reply (502, or
504 past the route timeout) instead of a socket that opens and dies. Then each side's messages are copied to the
other until either closes; the close code travels across.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.context import RequestContext
from gateway.errors import BadRequest, UpstreamTimeout, UpstreamUnavailable

__all__ = ["is_websocket_upgrade", "proxy_websocket"]

# Handshake headers the client library and the server response generate themselves.
_HANDSHAKE = ("sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol")
# How long, after one side closed, the close handshake may take before both sockets are cut (aiohttp's own close
# timeouts, 10 s on both sides, normally end it first).
_CLOSE_GRACE = 15.0


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    """A GET asking to upgrade to WebSocket. ``Upgrade`` counts only when ``Connection`` lists ``upgrade`` (RFC 9110
    7.8); without it the request is an ordinary one, and Upgrade is dropped as hop-by-hop."""
    if request.method != "GET" or request.headers.get("Upgrade", "").lower() != "websocket":
        return False
    return any(
        token.strip().lower() == "upgrade"
        for value in request.headers.getall("Connection", ())
        for token in value.split(",")
    )


async def proxy_websocket(
    ctx: RequestContext,
    session: aiohttp.ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    server_hostname: str | None = None,
) -> web.StreamResponse:
    """Relay one WebSocket: ``url`` is the upstream's ``http(s)`` URL (``wss`` for a cluster with TLS), and
    ``server_hostname`` the cluster's ``tls.server_name``."""
    request = ctx.request
    if not web.WebSocketResponse().can_prepare(request).ok:
        # Check the client's half of the handshake (key, version) before opening one upstream: a broken one is the
        # client's error (400), not an internal error after an upstream WebSocket was already opened and leaked.
        raise BadRequest("invalid WebSocket upgrade request")
    protocols = tuple(p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip())
    for name in _HANDSHAKE:
        headers.popall(name, None)
    try:
        # The route deadline bounds the upstream handshake as it bounds response headers on plain requests: an
        # upstream that accepts the connection but never answers must give 504, not hang the client forever.
        async with asyncio.timeout_at(ctx.deadline):
            upstream = await session.ws_connect(
                url.with_scheme("wss" if url.scheme == "https" else "ws"),
                headers=headers,
                protocols=protocols,
                autoping=False,
                autoclose=False,
                server_hostname=server_hostname,
            )
    except TimeoutError:
        raise UpstreamTimeout("upstream did not accept the WebSocket upgrade within the route timeout") from None
    except aiohttp.WSServerHandshakeError as exc:
        raise UpstreamUnavailable(f"upstream refused the WebSocket upgrade with status {exc.status}") from None
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"WebSocket connection to upstream failed: {type(exc).__name__}") from None
    downstream = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (), autoping=False, autoclose=False
    )
    downstream.headers["x-request-id"] = ctx.request_id  # CONTRACT 4: every response carries it, the 101 too
    if ctx.decision_id:
        downstream.headers["x-decision-id"] = ctx.decision_id
    try:
        await downstream.prepare(request)  # inside the try: the upstream socket is closed even if this fails
        ctx.status = 101
        await _relay_both(downstream, upstream)
    finally:
        await upstream.close()
        if downstream.prepared:
            await downstream.close()
    return downstream


async def _relay_both(downstream: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    to_upstream = asyncio.create_task(_pump(downstream, upstream))
    to_downstream = asyncio.create_task(_pump(upstream, downstream))
    tasks = (to_upstream, to_downstream)
    done: set[asyncio.Task[None]] = set()
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if pending and all(task.exception() is None for task in done):
            # One side closed. The pump that saw its CLOSE is still finishing the close handshake on both sockets
            # (the other pump stopped as soon as its socket started closing): cancelling it now would cut the
            # handshake short. aiohttp's own close timeouts bound it; the grace is only a backstop.
            await asyncio.wait(pending, timeout=_CLOSE_GRACE)
    finally:
        # Also reached when the handler is cancelled (client gone): never leave a pump running.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        task.result()


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    # receive(), not `async for`: the iterator ends *instead of* yielding the CLOSE message, so the close reason
    # was lost and the close was not answered with the code the peer sent.
    while True:
        message = await source.receive()
        if message.type == aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type == aiohttp.WSMsgType.PING:
            await sink.ping(message.data)
        elif message.type == aiohttp.WSMsgType.PONG:
            await sink.pong(message.data)
        elif message.type == aiohttp.WSMsgType.CLOSE:
            # The peer started the close: pass code and reason on (waits for the other peer's answer), then answer
            # the peer with its own code, as RFC 6455 5.5.1 suggests. A close frame without a code arrives as 0,
            # which cannot be sent: 1000 stands in for it.
            code = message.data or aiohttp.WSCloseCode.OK
            await sink.close(code=code, message=message.extra.encode() if message.extra else b"")
            await source.close(code=code)
            return
        elif message.type == aiohttp.WSMsgType.CLOSING:
            # The other pump is closing this socket (it called close() on it) and finishes the handshake itself.
            return
        else:  # CLOSED / ERROR: the connection ended without a close handshake
            await sink.close(code=aiohttp.WSCloseCode.GOING_AWAY)
            return
