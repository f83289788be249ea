"""The data-plane listener: aiohttp's low-level server, one handler, and protocol errors as contract replies.

The low-level ``web.Server`` is used instead of ``web.Application``: a proxy has one catch-all handler, so the
router, middlewares and per-request app plumbing would be pure overhead. Requests that aiohttp's parser rejects
(request line or headers over the limits, malformed framing) never reach the pipeline; ``_ProtocolHandler`` turns
them into the same JSON local reply, access log line and counter as every other local reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from typing import Any

import structlog
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from gateway.config.snapshot import Limits
from gateway.context import RequestContext
from gateway.errors import BadRequest, GatewayError, NotReady
from gateway.headers import new_request_id
from gateway.mesh.peer import peer_identity
from gateway.mesh.permissive import HANDSHAKE_TIMEOUT, SniffingSite
from gateway.pipeline import Handler
from gateway.serving import Serving
from gateway.stages.rescue import local_reply
from telemetry.metrics import Metrics

__all__ = ["GatewayServer"]

access_log = structlog.get_logger("meshgate.access")


class GatewayServer:
    """Owns the listener; ``serving`` is read once per request (the atomic-swap point)."""

    def __init__(self, pipeline: Handler, metrics: Metrics) -> None:
        self.serving: Serving | None = None
        self._pipeline = pipeline
        self._metrics = metrics
        self._runner: web.ServerRunner | None = None
        self._in_flight = 0
        self._idle: asyncio.Event | None = None  # set by the last request to finish while draining
        self._scheme = "http"  # "https" once started with TLS: url.scheme, x-forwarded-proto, the policy input
        # Mesh listener (strict or permissive): the mesh's trust domain; each connection's scheme and verified peer
        # identity are its own.
        self._mesh: str | None = None

    @property
    def in_flight(self) -> int:
        """Requests being handled now (``http_server_active_requests`` reads it at scrape time)."""
        return self._in_flight

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        serving = self.serving
        if serving is None:
            return self._not_ready()
        ctx = RequestContext(request, serving, time.perf_counter())
        ctx.scheme = self._scheme
        transport = request.transport
        if self._mesh is not None and transport is not None:
            ctx.scheme, ctx.peer_identity = _mesh_peer(request.protocol, transport, self._mesh)
        peer = transport.get_extra_info("peername") if transport is not None else None
        if peer:
            ctx.client_ip, ctx.client_port = peer[0], peer[1]
        self._in_flight += 1
        try:
            return await self._pipeline(ctx)
        finally:
            self._in_flight -= 1
            if not self._in_flight and self._idle is not None:
                self._idle.set()

    def _not_ready(self) -> web.StreamResponse:
        """A gateway started from a bootstrap binds its port before its first config arrives: until then every
        request is a 503 (``/readyz`` says so too, so a load balancer should not have sent it)."""
        self._metrics.local_replies.labels("unmatched", NotReady.code).inc()
        response = local_reply(NotReady("no config is serving yet"), new_request_id())
        response.headers["Retry-After"] = "1"
        return response

    async def start(
        self,
        host: str,
        port: int,
        *,
        reuse_port: bool,
        limits: Limits | None = None,
        ssl_context: ssl.SSLContext | None = None,
        mesh_trust_domain: str | None = None,
        permissive: bool = False,
    ) -> None:
        """Listen on ``host:port``. The parser limits are ``limits``, or the serving config's (then required).
        ``ssl_context``: serve TLS with it (``tls.reloader.ListenerCertificate.context``); None: plain HTTP.
        ``mesh_trust_domain``: the context is the mesh's: each request gets its connection's verified peer identity
        in this trust domain. ``permissive``: plain HTTP too, on the same port (``mesh.permissive``)."""
        if limits is None:
            serving = self.serving
            assert serving is not None
            limits = serving.snapshot.limits
        server = _Server(
            self.handle,
            metrics=self._metrics,
            handler_cancellation=True,  # a client that disconnects cancels its upstream call
            max_line_size=limits.max_request_line,
            max_field_size=limits.max_header_size,
            max_headers=limits.max_headers,
            auto_decompress=False,  # forward compressed request bodies untouched
            # After a local reply to an unread body (413, 401 ...) aiohttp reads and discards the rest before
            # closing, so the client sees the reply instead of a reset. Its default, 10 s, let a client push
            # gigabytes into the gateway after a 413; one second is enough for the reply to be read.
            lingering_time=1.0,
            access_log=None,
        )
        # The drain itself happens in stop(); aiohttp's own shutdown only cancels what is left, so its timeout
        # (which it waits twice: for handlers, then for their cancellation) is kept short.
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site: web.TCPSite
        if permissive:
            assert ssl_context is not None
            site = SniffingSite(self._runner, host, port, context=ssl_context, reuse_port=reuse_port, backlog=1024)
        else:
            site = _Site(self._runner, host, port, reuse_port=reuse_port, backlog=1024, ssl_context=ssl_context)
        await site.start()
        self._scheme = "https" if ssl_context is not None and not permissive else "http"
        self._mesh = mesh_trust_domain if ssl_context is not None else None

    async def stop(self, drain_timeout: float) -> None:
        """Stop accepting, close idle connections, let in-flight requests finish for up to ``drain_timeout``
        seconds (the value of the config serving now, reloads included), then cut what is left."""
        runner = self._runner
        if runner is None:
            return
        for site in list(runner.sites):
            await site.stop()
        if runner.server is not None:
            runner.server.pre_shutdown()  # idle keep-alive connections close now, busy ones after their response
        if self._in_flight:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), drain_timeout)
        await runner.cleanup()
        self._runner = None


class _Server(web.Server):
    def __init__(self, handler: Any, *, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.metrics = metrics

    def __call__(self) -> RequestHandler:
        return _ProtocolHandler(self, loop=self._loop, **self._kwargs)


def _mesh_peer(protocol: object, transport: asyncio.BaseTransport, trust_domain: str) -> tuple[str, str]:
    """``(scheme, peer identity)`` of a mesh listener's connection, worked out at its first request and kept on
    its handler: the certificate does not change for the connection's life, and decoding it costs microseconds."""
    known: tuple[str, str] | None = getattr(protocol, "mesh_peer", None)
    if known is not None:
        return known
    tls = transport.get_extra_info("ssl_object")
    known = ("https", peer_identity(tls, trust_domain)) if tls is not None else ("http", "")
    if isinstance(protocol, _ProtocolHandler):
        protocol.mesh_peer = known
    return known


class _ProtocolHandler(RequestHandler):
    """aiohttp's connection handler with protocol-level errors rendered as the contract's JSON reply."""

    mesh_peer: tuple[str, str] | None = None  # (scheme, peer identity), see _mesh_peer

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        error: GatewayError
        if status == 400 or isinstance(exc, http_exceptions.HttpProcessingError):
            error = BadRequest(_describe(exc))
        else:
            error = GatewayError("internal error")
        request_id = new_request_id()
        response = local_reply(error, request_id)
        response.force_close()
        manager = self._manager
        if isinstance(manager, _Server):
            manager.metrics.local_replies.labels("unmatched", error.code).inc()
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        access_log.info(
            "request",
            request_id=request_id,
            method=None,
            path=None,
            route="unmatched",
            status=error.status,
            duration_ms=0.0,
            upstream=None,
            attempts=0,
            client_address=peer[0] if peer else None,
            decision_id=None,
            reason=error.code,
            detail=error.message,
        )
        return response


def _describe(exc: BaseException | None) -> str:
    """A one-line, client-safe description of a parser error."""
    if isinstance(exc, http_exceptions.LineTooLong):
        return "request line or header field too long"
    if isinstance(exc, http_exceptions.HttpProcessingError):
        text = (exc.message or type(exc).__name__).strip().splitlines()
        return f"malformed request: {text[0] if text else type(exc).__name__}"
    return "malformed request"


class _Site(web.TCPSite):
    """``web.TCPSite`` with a short TLS handshake timeout: asyncio's default (60 s) lets a client that never
    finishes its handshake hold a connection for a minute (the permissive listener uses the same bound)."""

    async def start(self) -> None:
        if self._ssl_context is None:
            await super().start()
            return
        await web.BaseSite.start(self)  # registers the site with the runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server,
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
