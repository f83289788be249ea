"""WebSocket pass-through: the upgrade is accepted only once the upstream accepted it, then frames are relayed.

The upstream handshake runs first so a refusing or unreachable upstream becomes an ordinary local reply (502) or
the upstream's own status, instead of a socket that opens and dies. Then each side's messages are copied to the
other until either closes; the close code travels across.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.context import RequestContext
from gateway.errors import UpstreamUnavailable

__all__ = ["is_websocket_upgrade", "proxy_websocket"]

# Handshake headers the client library and the server response generate themselves.
_HANDSHAKE = ("sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol")


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    return request.method == "GET" and request.headers.get("Upgrade", "").lower() == "websocket"


async def proxy_websocket(
    ctx: RequestContext, session: aiohttp.ClientSession, url: URL, headers: CIMultiDict[str]
) -> web.StreamResponse:
    request = ctx.request
    protocols = tuple(p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip())
    for name in _HANDSHAKE:
        headers.popall(name, None)
    try:
        upstream = await session.ws_connect(
            url.with_scheme("ws"), headers=headers, protocols=protocols, autoping=False, autoclose=False
        )
    except aiohttp.WSServerHandshakeError as exc:
        raise UpstreamUnavailable(f"upstream refused the WebSocket upgrade with status {exc.status}") from None
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"WebSocket connection to upstream failed: {type(exc).__name__}") from None
    downstream = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (), autoping=False, autoclose=False
    )
    await downstream.prepare(request)
    ctx.status = 101
    try:
        await _relay_both(downstream, upstream)
    finally:
        await upstream.close()
        await downstream.close()
    return downstream


async def _relay_both(downstream: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    to_upstream = asyncio.create_task(_pump(downstream, upstream))
    to_downstream = asyncio.create_task(_pump(upstream, downstream))
    done, pending = await asyncio.wait({to_upstream, to_downstream}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()


async def _pump(
    source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    async for message in source:
        if message.type == aiohttp.WSMsgType.TEXT:
            await sink.send_str(message.data)
        elif message.type == aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(message.data)
        elif message.type == aiohttp.WSMsgType.PING:
            await sink.ping(message.data)
        elif message.type == aiohttp.WSMsgType.PONG:
            await sink.pong(message.data)
        elif message.type == aiohttp.WSMsgType.CLOSE:
            await sink.close(code=message.data, message=message.extra.encode() if message.extra else b"")
            return
        else:  # CLOSING / CLOSED / ERROR
            break
    await sink.close(code=source.close_code or aiohttp.WSCloseCode.GOING_AWAY)
