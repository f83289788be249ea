"""One upstream attempt: send the request, wait for response headers, classify what went wrong if anything.

The outcome is either the upstream's response (headers received, body still unread) or a failure kind from a
small fixed set, which is what retry policies (``retry.on``), breakers, outlier detection and the ``error_type``
metric label all speak.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator

import aiohttp
from multidict import CIMultiDict
from yarl import URL

__all__ = ["FailureKind", "send"]

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
) -> aiohttp.ClientResponse | FailureKind:
    """Send one attempt; stop waiting for response headers at ``until`` (loop time; None = never)."""
    try:
        if until is None:
            return await session.request(method, url, headers=headers, data=data, allow_redirects=False)
        async with asyncio.timeout_at(until):
            return await session.request(method, url, headers=headers, data=data, allow_redirects=False)
    except aiohttp.ClientError as exc:  # before TimeoutError: aiohttp's connect timeout is both
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
