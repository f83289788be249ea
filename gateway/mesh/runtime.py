"""``Mesh``: the process handle for mesh mTLS. It holds the current certificate and CA bundle and the contexts built
from them: the listener's (swapped per handshake through ``tls.reloader.SwappableContext``) and the one every
``mesh_identity`` cluster's connector takes for each new connection (``connector.py``). Installing a certificate
or a bundle builds new contexts; connections already made, pooled keep-alive ones included, keep theirs.

Each ``--workers`` process is a gateway of its own and gets its own certificate (and key): nothing is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import Callable

import aiohttp
import structlog

from gateway.config.mesh import spiffe_id
from gateway.config.snapshot import MeshSettings
from gateway.mesh.contexts import bound_server_context, client_context, server_context
from gateway.mesh.identity import MeshCertificate, request_certificate
from gateway.mesh.renewal import Renewal
from gateway.mesh.trust import TRUST_INTERVAL, TrustPoller
from gateway.tls.reloader import SwappableContext

__all__ = ["STARTUP_WAIT", "Mesh"]

log = structlog.get_logger("meshgate.mesh")

# How long start-up waits for the first certificate before binding the listener anyway (not ready until one comes).
STARTUP_WAIT = 10.0


class Mesh:
    """Start with ``start()`` in a running loop; ``stop()`` at exit."""

    def __init__(
        self,
        settings: MeshSettings,
        service: str,
        url: str,
        token: Callable[[], str],
        rng: random.Random,
        *,
        trust_interval: float = TRUST_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.service = service
        self.identity = spiffe_id(settings.trust_domain, service)
        self._url = url
        self._token = token
        self._rng = rng
        self._clock = clock
        # The listener is bound with this context (the mode's verify settings, no certificate yet) and switches each
        # handshake to the newest complete one. None in `disabled` mode: the listener is plain HTTP.
        self.listener = SwappableContext(bound_server_context(settings.mtls)) if settings.mtls != "disabled" else None
        self.certificate: MeshCertificate | None = None
        self._ca: bytes | None = None
        self._client = client_context(None)
        self._ready = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.renewal = Renewal(self.obtain, self.install, rng, clock)
        self.trust = TrustPoller(self._session_now, url, token, self.install_trust, rng, trust_interval)

    @property
    def ready(self) -> bool:
        """A certificate is installed (and not expired: then peers refuse it, and so should /readyz)."""
        return self.certificate is not None and self._clock() < self.certificate.not_after

    def client_context(self) -> ssl.SSLContext:
        """The context for a new connection to a ``mesh_identity`` cluster."""
        return self._client

    async def obtain(self) -> MeshCertificate:
        return await request_certificate(self._session_now(), self._url, self._token(), self.service, self.identity)

    def install(self, cert: MeshCertificate) -> None:
        """Serve ``cert`` to new handshakes, on the listener and in new client connections."""
        # The bundle that came with it is the service's current one, as a poll of /v1/ca would be: the newest wins.
        self._ca = cert.ca_pem
        self._build(cert, cert.ca_pem)
        self.certificate = cert
        self._ready.set()
        log.info(
            "mesh_certificate_installed",
            identity=cert.identity,
            serial=cert.serial,
            not_after=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cert.not_after)),
            lifetime_s=round(cert.lifetime, 1),
        )

    def install_trust(self, ca_pem: bytes) -> None:
        """A new CA bundle (from ``GET /v1/ca``): trusted by new handshakes from now on."""
        self._ca = ca_pem
        if self.certificate is not None:
            self._build(self.certificate, ca_pem)
        log.info("mesh_ca_bundle_installed", certificates=ca_pem.count(b"-----BEGIN CERTIFICATE-----"))

    def _build(self, cert: MeshCertificate, ca_pem: bytes) -> None:
        # Both contexts are built before either is installed: a bundle OpenSSL refuses changes nothing.
        client = client_context(cert, ca_pem)
        server = server_context(cert, self.settings.mtls, ca_pem) if self.listener is not None else None
        self._client = client
        if self.listener is not None and server is not None:
            self.listener.install(server)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.renewal.run(self.certificate)),
            asyncio.create_task(self.trust.run()),
        ]

    async def wait_ready(self, within: float) -> bool:
        """Wait up to ``within`` seconds for the first certificate; ``False`` if none came (renewal keeps trying)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._ready.wait()
        return self.ready

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        return self._session
