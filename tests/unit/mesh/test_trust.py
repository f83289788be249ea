"""The CA bundle poller: a bundle is handed on once, and one that cannot be installed is asked for again."""

from __future__ import annotations

import random
import ssl
from types import TracebackType
from typing import Any, cast

import aiohttp
import pytest

from gateway.mesh.trust import TrustPoller

BUNDLE = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


class FakeResponse:
    def __init__(self, status: int, body: bytes, etag: str) -> None:
        self.status, self._body, self.headers = status, body, {"ETag": etag}

    async def read(self) -> bytes:
        return self._body

    async def __aenter__(self) -> FakeResponse:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        return None


class FakeSession:
    """Serves BUNDLE with ETag "1", and 304 to ``If-None-Match: "1"``."""

    def get(self, url: str, headers: dict[str, str], **_: Any) -> FakeResponse:
        if headers.get("If-None-Match") == '"1"':
            return FakeResponse(304, b"", '"1"')
        return FakeResponse(200, BUNDLE, '"1"')


async def test_a_bundle_that_fails_to_install_is_asked_for_again() -> None:
    # Bug fix: the bundle and its ETag were remembered before on_bundle ran: one OpenSSL refused was never retried
    # (every later poll a 304), and the ssl.SSLError ended the polling task.
    installed: list[bytes] = []
    calls: list[bytes] = []

    def on_bundle(pem: bytes) -> None:
        calls.append(pem)
        if len(calls) == 1:
            raise ssl.SSLError("cannot load")
        installed.append(pem)

    session = cast(aiohttp.ClientSession, FakeSession())
    poller = TrustPoller(lambda: session, "http://cs", lambda: "t", on_bundle, random.Random(0))
    with pytest.raises(ssl.SSLError):
        await poller.poll()
    assert poller.bundle is None
    assert await poller.poll() is True
    assert installed == [BUNDLE]
    assert await poller.poll() is False  # 304 from now on
