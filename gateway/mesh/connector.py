"""The connector of a ``mesh_identity`` cluster: mesh mTLS to another meshgate, and its identity checked.

Every new connection takes the mesh's newest client context (``Mesh.client_context``): a renewed certificate or a
new CA bundle is used by the next handshake, while pooled keep-alive connections stay as they are. OpenSSL checks
the chain against the mesh CAs, but not the SPIFFE URI (it matches DNS names and IPs only), so it is checked here,
right after the handshake and before the connection is used or pooled: a peer that proves another identity is
closed and the attempt fails as a TLS failure (``connect-failure``: nothing was sent, so it is safe to retry on
another endpoint), logged ``upstream_identity_mismatch`` by ``upstream/attempt.py``.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp.client_proto import ResponseHandler

from gateway.mesh.peer import uri_sans

if TYPE_CHECKING:
    from aiohttp import ClientTimeout
    from aiohttp.client_reqrep import ClientRequest, ConnectionKey
    from aiohttp.tracing import Trace

    from gateway.mesh.runtime import Mesh

__all__ = ["MeshConnector", "MeshIdentityMismatch"]


class MeshIdentityMismatch(aiohttp.ClientSSLError):
    """The peer's certificate verified, but names another identity than the cluster's ``mesh_identity``."""

    def __init__(self, connection_key: ConnectionKey, expected: str, presented: list[str]) -> None:
        self.expected = expected
        self.presented = presented
        error = ssl.SSLCertVerificationError(f"peer identity {presented or 'none'} is not {expected}")
        super().__init__(connection_key, error)


class MeshConnector(aiohttp.TCPConnector):
    def __init__(self, mesh: Mesh, expected: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._mesh = mesh
        self._expected = expected

    def _get_ssl_context(self, req: ClientRequest) -> ssl.SSLContext | None:
        return self._mesh.client_context() if req.is_ssl() else None

    async def _create_connection(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> ResponseHandler:
        protocol = await super()._create_connection(req, traces, timeout)
        if not req.is_ssl():
            return protocol
        transport = protocol.transport
        tls = transport.get_extra_info("ssl_object") if transport is not None else None
        presented = uri_sans(tls.getpeercert() if tls is not None else None)
        if self._expected not in presented:
            protocol.close()
            raise MeshIdentityMismatch(req.connection_key, self._expected, presented)
        return protocol
