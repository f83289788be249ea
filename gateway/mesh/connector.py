"""The connector of a ``mesh_identity`` cluster: mesh mTLS to another meshgate, and its identity checked.

Every new connection takes the mesh's newest client context (``Mesh.client_context``): a renewed certificate or a
new CA bundle is used by the next handshake, while pooled keep-alive connections stay as they are. OpenSSL checks
the chain against the mesh CAs, but not the SPIFFE URI (it matches DNS names and IPs only), so it is checked here,
right after the handshake and before the connection is used or pooled, by the listener's rules (``peer.py``: a
verified leaf whose one URI SAN is exactly the expected identity): a peer that proves another identity is
closed and the attempt fails as a TLS failure (``connect-failure``: nothing was sent, so it is safe to retry on
another endpoint), logged ``upstream_identity_mismatch`` by ``upstream/attempt.py``.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from cryptography import x509

from gateway.mesh.peer import peer_identity, uri_sans

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
        # Always the mesh's context, whatever the request asked for: a mesh cluster is never called in plain text.
        return self._mesh.client_context()

    async def _create_connection(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> ResponseHandler:
        if not req.is_ssl():
            # Fail closed: an http:// URL on a mesh cluster would otherwise skip both mTLS and the identity check.
            raise aiohttp.ClientSSLError(req.connection_key, ssl.SSLError("mesh clusters are called over TLS only"))
        protocol = await super()._create_connection(req, traces, timeout)
        transport = protocol.transport
        tls = transport.get_extra_info("ssl_object") if transport is not None else None
        if peer_identity(tls, self._mesh.settings.trust_domain) != self._expected:
            protocol.close()
            raise MeshIdentityMismatch(req.connection_key, self._expected, _presented(tls))
        return protocol


def _presented(tls: ssl.SSLObject | None) -> list[str]:
    """The URI SANs the peer's certificate carries, for the log line."""
    der = tls.getpeercert(binary_form=True) if tls is not None else None
    if der is None:
        return []
    try:
        return uri_sans(x509.load_der_x509_certificate(der))
    except ValueError:
        return []
