"""The mesh CA bundle, polled from the config service (``GET /v1/ca``, ETag and ``If-None-Match``).

CA rotation is "add the new CA beside the old, move every certificate to the new one, retire the old": each step
changes the bundle, and each gateway must trust what the bundle says before the next step. The poll is cheap (a 304
while nothing changes); a new bundle goes into new contexts for new handshakes (listener and clients alike), so no
established connection is dropped.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import aiohttp
import structlog

from gateway.resilience.backoff import full_jitter

__all__ = ["TRUST_INTERVAL", "TrustPoller"]

log = structlog.get_logger("meshgate.mesh")

TRUST_INTERVAL = 30.0
_TIMEOUT = 10.0
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


class TrustPoller:
    """Calls ``on_bundle(pem)`` with each new bundle the config service serves."""

    def __init__(
        self,
        session: Callable[[], aiohttp.ClientSession],
        url: str,
        token: Callable[[], str],
        on_bundle: Callable[[bytes], None],
        rng: random.Random,
        interval: float = TRUST_INTERVAL,
    ) -> None:
        self._session = session
        self._url = f"{url}/v1/ca"
        self._token = token
        self._on_bundle = on_bundle
        self._rng = rng
        self._interval = interval
        self._etag: str | None = None
        self.bundle: bytes | None = None

    async def poll(self) -> bool:
        """One request; ``True`` when a new bundle was handed on. Errors are raised (``run`` logs them)."""
        headers = {"Authorization": f"Bearer {self._token()}"}
        if self._etag is not None:
            headers["If-None-Match"] = self._etag
        timeout = aiohttp.ClientTimeout(total=_TIMEOUT)
        async with self._session().get(self._url, headers=headers, timeout=timeout) as response:
            if response.status == 304:
                return False
            if response.status != 200:
                raise RuntimeError(f"GET /v1/ca answered {response.status}")
            body = await response.read()
            etag = response.headers.get("ETag")
        if _PEM_CERT not in body:
            raise RuntimeError("GET /v1/ca answered no PEM certificate")
        if body != self.bundle:
            # Handed on first, remembered after: a bundle ``on_bundle`` refuses (OpenSSL cannot load it) is asked
            # for again on the next poll instead of being taken for installed.
            self._on_bundle(body)
        self._etag = etag
        changed, self.bundle = body != self.bundle, body
        return changed

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await self.poll()
                failures = 0
                delay = self._interval * self._rng.uniform(0.9, 1.1)
            except Exception as exc:  # ssl.SSLError from on_bundle too: the poller must not die
                failures += 1
                delay = min(self._interval, 0.5 + full_jitter(failures - 1, 1.0, self._interval, self._rng))
                log.warning("mesh_ca_poll_failed", error=str(exc) or type(exc).__name__, retry_in_s=round(delay, 2))
            await asyncio.sleep(delay)
