"""Permissive mode: mesh mTLS or plain HTTP on one port, told apart by the first byte of each connection.

A TLS connection starts with a handshake record, whose first byte is 0x16; an HTTP/1.x request starts with a method
name (ASCII letters). ``_Sniffer`` sits in front of aiohttp's ``RequestHandler`` factory: it reads the first bytes
of a new connection, then hands the connection on, replaying those bytes, either to the handler directly (plain
HTTP) or to a TLS protocol wrapping the handler (server side, the listener's context: a client certificate is
verified when given, and optional). Istio's PeerAuthentication PERMISSIVE mode does the same, for migrating callers
to mTLS one at a time.

The bytes already read cannot be pushed back into the socket, so ``loop.start_tls`` (which reads the handshake from
the socket) cannot be used: the TLS protocol is built here and fed the first bytes. Both event loops the gateway
runs on (uvloop, asyncio for tests) have such a protocol with the same constructor, and both are buffered protocols.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from collections.abc import Callable
from typing import Any

from aiohttp import web

__all__ = ["HANDSHAKE_TIMEOUT", "SNIFF_TIMEOUT", "SniffingSite"]

TLS_HANDSHAKE = 0x16  # the content type of a TLS handshake record
SNIFF_TIMEOUT = 10.0  # a connection that sends nothing is closed after this (slowloris on the first byte)
HANDSHAKE_TIMEOUT = 10.0


def _tls_protocol_class(loop: asyncio.AbstractEventLoop) -> Callable[..., Any]:
    try:
        import uvloop
        import uvloop.loop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return sslproto.SSLProtocol
    uvloop_protocol: Callable[..., Any] = uvloop.loop.SSLProtocol  # type: ignore[attr-defined]  # no stub
    return uvloop_protocol if isinstance(loop, uvloop.Loop) else sslproto.SSLProtocol


def _feed(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    view = memoryview(data)
    while view:
        buffer = memoryview(protocol.get_buffer(len(view)))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]


def _retrieve(waiter: asyncio.Future[Any]) -> None:
    # A failed handshake (a plain client that happened to send 0x16, an untrusted certificate) is the client's
    # problem: the transport is closed by the TLS protocol; the waiter's exception is only read, never raised.
    if not waiter.cancelled():
        waiter.exception()


class _Sniffer(asyncio.Protocol):
    def __init__(
        self, factory: Callable[[], asyncio.Protocol], context: ssl.SSLContext, pending: set[_Sniffer]
    ) -> None:
        self._factory = factory
        self._context = context
        self._pending = pending
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio's classes
        self._pending.add(self)
        self._timer = asyncio.get_running_loop().call_later(SNIFF_TIMEOUT, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._done()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.discard(self)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or not data:
            return
        self._done()
        self._transport = None
        handler = self._factory()
        if data[0] != TLS_HANDSHAKE:
            transport.set_protocol(handler)
            handler.connection_made(transport)
            handler.data_received(data)
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        waiter.add_done_callback(_retrieve)
        tls = _tls_protocol_class(loop)(
            loop, handler, self._context, waiter, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
        )
        transport.set_protocol(tls)
        tls.connection_made(transport)
        _feed(tls, data)


class SniffingSite(web.TCPSite):
    """``web.TCPSite`` serving plain HTTP and TLS (with ``context``) on one port."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, context: ssl.SSLContext, **kwargs: Any):
        super().__init__(runner, host, port, **kwargs)
        self._tls_context = context
        self._sniffing: set[_Sniffer] = set()

    @property
    def name(self) -> str:
        return f"http+https://{self._host}:{self._port}"

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        context, sniffing = self._tls_context, self._sniffing
        self._server = await loop.create_server(
            lambda: _Sniffer(server, context, sniffing),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )

    async def stop(self) -> None:
        await super().stop()
        # Connections still deciding belong to nobody else yet: aiohttp's shutdown does not know them.
        for sniffer in list(self._sniffing):
            sniffer.abort()
