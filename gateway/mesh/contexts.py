"""``ssl.SSLContext``s for mesh mTLS, built from a ``MeshCertificate`` held in memory.

Python's ``load_cert_chain`` only reads files. The key is handed to it through an anonymous in-memory file
(``memfd_create``, Linux): it never touches a disk. Where memfd is missing, a file readable by this user only
(0600) is written in the gateway's own cache directory and removed as soon as OpenSSL has read it.

Both sides use the listener's hardened defaults (TLS 1.2+, AEAD suites, ``http/1.1`` ALPN) and trust the mesh CA
bundle only, never the system's CAs: a certificate from any other CA is refused. Names are not checked by OpenSSL
(mesh certificates carry a SPIFFE URI, which it does not match): the client checks the URI SAN after the handshake
(``connector.py``), and the listener reads it as the caller's identity (``peer.py``).
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from pathlib import Path

from gateway.config.snapshot import MeshMode
from gateway.mesh.identity import MeshCertificate
from gateway.tls.contexts import harden

__all__ = ["bound_server_context", "client_context", "load_pair", "server_context"]

# What the listener asks of a caller: strict requires a certificate, permissive verifies one when it is given.
_VERIFY: dict[MeshMode, ssl.VerifyMode] = {
    "strict": ssl.CERT_REQUIRED,
    "permissive": ssl.CERT_OPTIONAL,
    "disabled": ssl.CERT_NONE,
}


def load_pair(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes, spill_dir: Path | None = None) -> None:
    """``context.load_cert_chain`` from memory (see the module docstring); ``spill_dir``: where the 0600 fallback
    file goes when memfd is not available."""
    data = cert_pem + key_pem
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        fd = memfd("meshgate-mesh-key", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    directory = spill_dir if spill_dir is not None else Path(tempfile.gettempdir())  # pragma: no cover - not Linux
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)  # pragma: no cover
    fd, name = tempfile.mkstemp(prefix=".mesh-key-", dir=directory)  # mkstemp: mode 0600  # pragma: no cover
    try:  # pragma: no cover
        os.write(fd, data)
        os.close(fd)
        context.load_cert_chain(name)
    finally:  # pragma: no cover
        with contextlib.suppress(OSError):
            os.unlink(name)


def server_context(cert: MeshCertificate, mode: MeshMode, ca_pem: bytes | None = None) -> ssl.SSLContext:
    """The listener's context for ``mode`` (strict or permissive), trusting ``ca_pem`` (default: the bundle that
    came with the certificate)."""
    context = bound_server_context(mode)
    load_pair(context, cert.cert_pem, cert.key_pem)
    context.load_verify_locations(cadata=(ca_pem or cert.ca_pem).decode("ascii"))
    return context


def bound_server_context(mode: MeshMode) -> ssl.SSLContext:
    """A listener context with the per-connection settings of ``mode`` and no certificate yet: the one a socket is
    bound with when the first certificate has not arrived (handshakes fail until ``install`` swaps one in)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    harden(context)
    context.verify_mode = _VERIFY[mode]
    # No session resumption: a resumed session is not verified again, so it would let a caller skip
    # client-certificate verification (and keep an identity past its certificate). TLS 1.3 issues no tickets at
    # all with num_tickets = 0 (OP_NO_TICKET alone only makes them stateful); OP_NO_TICKET covers TLS 1.2.
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    return context


def client_context(cert: MeshCertificate | None, ca_pem: bytes | None = None) -> ssl.SSLContext:
    """A context for calls to ``mesh_identity`` clusters: the mesh certificate as client certificate, the mesh CAs
    as the only trust. Without a certificate yet, one that trusts nothing: every handshake fails (as a TLS
    failure, never as a plain-text call)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    harden(context)
    context.check_hostname = False  # the URI SAN is checked after the handshake (connector.py)
    context.verify_mode = ssl.CERT_REQUIRED
    bundle = ca_pem or (cert.ca_pem if cert is not None else None)
    if bundle:
        context.load_verify_locations(cadata=bundle.decode("ascii"))
    if cert is not None:
        load_pair(context, cert.cert_pem, cert.key_pem)
    return context
