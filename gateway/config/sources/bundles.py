"""Bundles named by a pushed config: downloaded from the config service and kept by content on disk.

A bundle is stored as ``cache_dir/<service>/bundles/<name>/<sha256>.tar.gz`` and never rewritten: a snapshot names
the exact file it was applied with, so a new bundle that does not load leaves the file the serving (and the cached)
config uses untouched, and a restart from the cache loads the bytes that were serving. Files of a name the serving
and cached configs no longer use are removed only after a successful apply (``prune``).

``BundleStore.fetch`` asks with ``If-None-Match`` and answers the content's digest. ``BundleRefresher`` asks again
every ``bundle_refresh`` for the bundles the serving version names and hands a changed set of digests to the remote
source, which applies the serving version again pointing at the new files (a new snapshot through the normal apply
path, not a file rewritten under the policy runtime's watcher); a set it refused is not offered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import aiohttp
import structlog

from gateway.config.bootstrap import bundle_file
from gateway.config.errors import ConfigError, Problem
from gateway.config.sources.answers import ServiceUnavailable, check_status
from gateway.config.sources.cache import write_atomic

__all__ = ["BundleRefresher", "BundleStore", "Bundled", "prune_bundles", "store_bundle"]

log = structlog.get_logger("meshgate.config")

# A bundle download (up to 64 MiB).
_TIMEOUT = aiohttp.ClientTimeout(total=60.0, sock_connect=5.0)


class BundleStore:
    """Downloads bundles into ``directory/bundles``. ``headers`` gives the auth headers of each request (it raises
    ``ServiceUnavailable`` for an unreadable token file)."""

    def __init__(
        self,
        base_url: str,
        directory: Path,
        session: Callable[[], aiohttp.ClientSession],
        headers: Callable[[], dict[str, str]],
    ) -> None:
        self._base = base_url
        self.directory = directory
        self._session = session
        self._headers = headers
        self._lock = asyncio.Lock()  # the poller and the refresher may ask for the same name at once
        self._known: dict[str, tuple[str, str]] = {}  # name -> (the service's ETag, the digest it named)

    async def fetch(self, where: str, name: str) -> str:
        """The sha256 of the service's bundle ``name``, its file present on disk. ``ConfigError`` if the service
        has no such bundle (at ``where``), ``ServiceUnavailable`` if it cannot be asked, ``OSError`` if the file
        cannot be written."""
        async with self._lock:
            headers = self._headers()
            known = self._known.get(name)
            if known is not None and bundle_file(self.directory, name, known[1]).exists():
                headers["If-None-Match"] = known[0]
            url = f"{self._base}/v1/bundles/{urllib.parse.quote(name, safe='')}"
            try:
                async with self._session().get(url, headers=headers, timeout=_TIMEOUT) as answer:
                    if answer.status == 304 and known is not None:
                        return known[1]
                    if answer.status == 404:
                        raise ConfigError((Problem(where, f"no bundle named {name!r} in the config service"),))
                    check_status(answer.status)
                    data = await answer.read()
                    etag = answer.headers.get("ETag")
            except (aiohttp.ClientError, OSError, TimeoutError) as error:
                raise ServiceUnavailable(f"bundle {name}: {type(error).__name__}: {error}".rstrip(": ")) from None
            digest = hashlib.sha256(data).hexdigest()
            written = await asyncio.to_thread(store_bundle, bundle_file(self.directory, name, digest), data)
            # Without an ETag from the service, the digest quoted (what the config service sends) is asked next.
            self._known[name] = (etag or f'"{digest}"', digest)
            if written:
                log.info("bundle_downloaded", bundle=name, bytes=len(data), sha256=digest, etag=etag)
            return digest

    async def prune(self, serving: Mapping[str, str], cached: Mapping[str, str]) -> None:
        """After an apply: remove the files of each bundle ``serving`` names but those of ``serving`` and ``cached``
        (the digests config.json names: a restart may still load them)."""
        keep = {name: {digest, cached.get(name, digest)} for name, digest in serving.items()}
        try:
            removed = await asyncio.to_thread(prune_bundles, self.directory, keep)
        except OSError as error:
            log.warning("bundle_prune_failed", path=str(self.directory), error=str(error))
            return
        for path in removed:
            log.info("bundle_removed", path=str(path))

    def remember(self, digests: Mapping[str, str]) -> None:
        """Files already on disk (a cached config's): the next ``fetch`` may ask with ``If-None-Match``."""
        for name, digest in digests.items():
            self._known.setdefault(name, (f'"{digest}"', digest))


class Bundled(Protocol):
    """What a serving version says about its bundles."""

    @property
    def bundles(self) -> tuple[tuple[str, str], ...]: ...  # (where, name)

    @property
    def digests(self) -> Mapping[str, str]: ...  # name -> sha256 of the file applied


S = TypeVar("S", bound=Bundled)


class BundleRefresher(Generic[S]):
    """Re-fetch the serving version's bundles every ``interval``. ``serving()`` is what serves now (``None``: nothing
    yet); ``apply(serving, digests)`` applies it again with those files and says whether it took them."""

    def __init__(
        self,
        store: BundleStore,
        interval: float,
        serving: Callable[[], S | None],
        apply: Callable[[S, dict[str, str]], Awaitable[bool]],
    ) -> None:
        self._store = store
        self._interval = interval
        self._serving = serving
        self._apply = apply
        self._failing = False
        self._refused: tuple[S, dict[str, str]] | None = None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.once()

    async def once(self) -> None:
        serving = self._serving()
        if serving is None or not serving.bundles:
            return
        failed: str | None = None
        digests: dict[str, str] = {}
        for where, name in serving.bundles:
            try:
                digests[name] = await self._store.fetch(where, name)
            except (ServiceUnavailable, ConfigError, OSError) as error:  # OSError: writing under cache_dir
                failed = str(error)
        # Logged when it starts and stops failing, not every few seconds while the service is away.
        if failed is not None and not self._failing:
            log.warning("bundle_refresh_failed", error=failed)
        elif failed is None and self._failing:
            log.info("bundle_refresh_recovered")
        self._failing = failed is not None
        if failed is not None or digests == serving.digests:
            return
        if self._refused is not None and self._refused[0] is serving and self._refused[1] == digests:
            return  # refused already (and reported): tried again when the bundle changes, or another version serves
        self._refused = None if await self._apply(serving, digests) else (serving, digests)


def store_bundle(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` (named by its digest) unless it is there already; True if written."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    write_atomic(path, data)
    return True


def prune_bundles(directory: Path, keep: Mapping[str, set[str]]) -> list[Path]:
    """Remove every stored file of each name in ``keep`` but the digests kept; returns what was removed. Names not in
    ``keep`` are left alone (another config may name them again)."""
    removed: list[Path] = []
    for name, digests in keep.items():
        with contextlib.suppress(FileNotFoundError):
            for path in (directory / "bundles" / name).iterdir():
                if path.name.endswith(".tar.gz") and path.name.removesuffix(".tar.gz") not in digests:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        removed.append(path)
    return removed
