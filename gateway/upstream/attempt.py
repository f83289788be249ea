"""One upstream attempt: send the request, wait for response headers, classify what went wrong if anything.

The outcome is either the upstream's response (headers received, body still unread) or a failure kind from a
small fixed set, which is what retry policies (``retry.on``), breakers, outlier detection and the ``error_type``
metric label all speak.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
from collections.abc import AsyncIterator

import aiohttp
import structlog
from multidict import CIMultiDict
from yarl import URL

from gateway.mesh.connector import MeshIdentityMismatch

__all__ = ["FailureKind", "send"]

log = structlog.get_logger("meshgate.upstream")

# connect-failure | refused | reset | timeout (the per-try timeout) | deadline (the route's) | protocol_error
FailureKind = str


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    data: bytes | AsyncIterator[bytes] | None,
    *,
    until: float | None,
    deadline: float | None,
    server_hostname: str | None = None,
    upstream: str = "",
) -> aiohttp.ClientResponse | FailureKind:
    """Send one attempt; stop waiting for response headers at ``until`` (loop time; None = never).

    ``server_hostname``: the name sent as SNI and checked against an ``https`` upstream's certificate (None: the
    URL's host). ``upstream``: the cluster's name, for the log line of a failed TLS handshake.
    """
    try:
        if until is None:
            return await session.request(
                method, url, headers=headers, data=data, allow_redirects=False, server_hostname=server_hostname
            )
        async with asyncio.timeout_at(until):
            return await session.request(
                method, url, headers=headers, data=data, allow_redirects=False, server_hostname=server_hostname
            )
    except aiohttp.ClientError as exc:  # before TimeoutError: aiohttp's connect timeout is both
        if isinstance(exc, MeshIdentityMismatch):
            # The chain verified, but the peer is another service: a mis-pointed endpoint, or an impostor.
            log.warning(
                "upstream_identity_mismatch",
                upstream=upstream,
                endpoint=f"{url.host}:{url.port}",
                expected=exc.expected,
                presented=exc.presented,
            )
        elif isinstance(exc, aiohttp.ClientSSLError):
            # The client only sees "connect-failure"; the operator needs to know it was the handshake, and why
            # (unknown CA, name mismatch, no client certificate ...), or a wrong CA looks like a dead upstream.
            log.warning(
                "upstream_tls_failed",
                upstream=upstream,
                endpoint=f"{url.host}:{url.port}",
                server_name=server_hostname or url.host,
                error=_tls_reason(exc),
            )
        return classify(exc)
    except TimeoutError:
        return "deadline" if deadline is not None and until is not None and until >= deadline else "timeout"


def classify(exc: aiohttp.ClientError) -> FailureKind:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connect-failure"  # nothing was sent: as safe to retry as a refused connection
    if isinstance(exc, aiohttp.ClientConnectorError):
        # Connect errors wrap the OSError; "refused" is the one retry policies may single out.
        return "refused" if exc.os_error.errno == errno.ECONNREFUSED else "connect-failure"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError | aiohttp.ClientConnectionResetError):
        return "reset"
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return "timeout"
    return "protocol_error"


def _tls_reason(exc: aiohttp.ClientSSLError) -> str:
    """OpenSSL's reason for a failed handshake (``certificate verify failed: unable to get local issuer
    certificate``), without aiohttp's wrapping."""
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_message:
        return f"certificate verify failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError) and cause.reason:
        return cause.reason.lower().replace("_", " ")
    return str(cause or exc)
