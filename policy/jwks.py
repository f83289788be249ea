"""Where verification keys come from: a local key file (``StaticKeys``) or an IdP's JWKS URL (``JwksKeys``).

Both answer ``keys(kid)`` with an immutable ``KeySet`` that ``policy.jwt.verify`` checks tokens against.
``JwksKeys`` keeps the last good set and refreshes it in the background; a token naming a kid it has not seen
(the IdP rotated) triggers one early refetch, shared by all concurrent callers and rate limited, so a flood of
made-up kids cannot turn the gateway into a load generator against the IdP. An IdP outage never drops keys that
were once loaded: it only delays rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol

import aiohttp
import structlog
from yarl import URL

from policy.jwt import KeySet, Unauthenticated

__all__ = ["MAX_JWKS_BYTES", "JwksKeys", "KeySource", "StaticKeys"]

MAX_JWKS_BYTES: Final = 1 << 20  # real JWKS documents are a few KiB; anything near this is not one

log = structlog.get_logger("meshgate.jwks")


class KeySource(Protocol):
    """The authn stage's view of its keys."""

    async def keys(self, kid: str | None) -> KeySet:
        """The current key set, refreshed first if it cannot resolve ``kid`` and a refresh is allowed.

        Raises ``Unauthenticated("keys_unavailable")`` while no key set has ever been loaded.
        """
        ...

    async def start(self) -> None:
        """Load keys and start any background refresh. Never raises for an unreachable IdP."""
        ...

    async def close(self) -> None:
        """Stop background work and release connections."""
        ...


class StaticKeys(KeySource):
    """Keys from a local file, read once: PEM public key(s) / certificate(s), or one JWKS JSON document."""

    def __init__(self, keyset: KeySet) -> None:
        self._keyset = keyset

    @classmethod
    def from_file(cls, path: str | Path) -> StaticKeys:
        """Load ``path``; ``ValueError("<path>: <problem>")`` if it cannot be read or holds no usable key."""
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise ValueError(f"{path}: cannot read key file: {error.strerror or error}") from None
        try:
            if data.lstrip().startswith(b"{"):
                try:
                    doc = json.loads(data)
                except ValueError as error:
                    raise ValueError(f"not valid JSON: {error}") from None
                return cls(KeySet.from_jwks(doc))
            return cls(KeySet.from_pem(data))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    async def keys(self, kid: str | None) -> KeySet:
        return self._keyset

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class _FetchError(Exception):
    """A JWKS fetch that produced no usable key set; the message is safe to log (never the body)."""


class JwksKeys(KeySource):
    """Keys from a JWKS URL: fetched at start, refreshed every ``refresh_interval``, refetched early on unknown kids.

    ``clock`` (monotonic seconds) only paces the unknown-kid refetch; background sleeps use the event loop.
    """

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession | None = None,
        refresh_interval: float = 300.0,
        min_refetch_interval: float = 10.0,
        fetch_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        retry_initial: float = 1.0,
        max_bytes: int = MAX_JWKS_BYTES,
    ) -> None:
        self._url = url
        self._session = session
        self._owns_session = session is None
        self._refresh_interval = refresh_interval
        self._min_refetch_interval = min_refetch_interval
        self._timeout = aiohttp.ClientTimeout(total=fetch_timeout)
        self._clock = clock
        self._retry_initial = min(retry_initial, refresh_interval)
        self._max_bytes = max_bytes
        self._keyset: KeySet | None = None
        self._last_fetch: float | None = None  # clock() when the latest fetch started
        self._inflight: asyncio.Task[bool] | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._failing = False  # logs once per state change, not once per retry
        self._fetches = 0
        # Userinfo and query may hold credentials; neither belongs in a log line.
        self._log_url = str(URL(url).with_user(None).with_query(None).with_fragment(None))

    @property
    def fetches(self) -> int:
        """How many fetches were started (for tests and status pages)."""
        return self._fetches

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False)
        ok = await self._refresh()
        self._loop_task = asyncio.create_task(self._run(ok), name=f"jwks-refresh {self._log_url}")

    async def close(self) -> None:
        for task in (self._loop_task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._loop_task = self._inflight = None
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def keys(self, kid: str | None) -> KeySet:
        keyset = self._keyset
        if keyset is None or not keyset.resolves(kid):
            if self._inflight is not None and not self._inflight.done():
                await asyncio.shield(self._inflight)
            elif self._last_fetch is None or self._clock() - self._last_fetch >= self._min_refetch_interval:
                await self._refresh()
            keyset = self._keyset
        if keyset is None:
            raise Unauthenticated("keys_unavailable")
        return keyset

    async def _run(self, ok: bool) -> None:
        """Refresh forever: every ``refresh_interval`` while healthy, with doubling backoff while failing."""
        delay = self._refresh_interval if ok else self._retry_initial
        while True:
            await asyncio.sleep(delay)
            ok = await self._refresh()
            delay = self._refresh_interval if ok else min(delay * 2, self._refresh_interval)

    async def _refresh(self) -> bool:
        """Fetch now, or join the fetch already in flight; True if it produced a key set."""
        if self._inflight is None or self._inflight.done():
            self._last_fetch = self._clock()
            self._fetches += 1
            self._inflight = asyncio.create_task(self._fetch_and_apply())
        # Shielded: a caller whose request is cancelled must not cancel the fetch others are waiting on.
        return await asyncio.shield(self._inflight)

    async def _fetch_and_apply(self) -> bool:
        try:
            keyset = KeySet.from_jwks(await self._fetch())
        except Exception as error:  # whatever the IdP sends or does, keep the last good keys
            if not self._failing:
                log.warning(
                    "jwks_fetch_failed",
                    url=self._log_url,
                    error=_describe(error).replace(self._url, self._log_url),
                    keeping_previous_keys=self._keyset is not None,
                )
            self._failing = True
            return False
        previous, self._keyset = self._keyset, keyset
        if self._failing or previous is None or previous.kids != keyset.kids:
            log.info("jwks_refreshed", url=self._log_url, keys=len(keyset), kids=sorted(keyset.kids))
        if keyset.skipped and (previous is None or previous.skipped != keyset.skipped):
            log.warning("jwks_keys_skipped", url=self._log_url, skipped=list(keyset.skipped))
        self._failing = False
        return True

    async def _fetch(self) -> object:
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False)
        headers = {"Accept": "application/jwk-set+json, application/json"}
        async with self._session.get(self._url, timeout=self._timeout, headers=headers) as response:
            if response.status != 200:
                raise _FetchError(f"HTTP {response.status}")
            if response.content_length is not None and response.content_length > self._max_bytes:
                raise _FetchError(f"response of {response.content_length} bytes exceeds {self._max_bytes}")
            # Read at most one byte past the limit, whatever the (possibly absent or lying) Content-Length says.
            body = bytearray()
            while len(body) <= self._max_bytes:
                chunk = await response.content.read(self._max_bytes + 1 - len(body))
                if not chunk:
                    break
                body += chunk
            if len(body) > self._max_bytes:
                raise _FetchError(f"response exceeds {self._max_bytes} bytes")
        try:
            # The body must parse as JSON; Content-Type is not insisted on, since IdPs and static hosts label JWKS
            # documents variously (application/json, application/jwk-set+json, text/plain, octet-stream).
            return json.loads(body)
        except (ValueError, RecursionError):
            raise _FetchError("response is not JSON") from None


def _describe(error: BaseException) -> str:
    """A short, loggable account of a failed fetch."""
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, _FetchError | ValueError):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
