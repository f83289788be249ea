"""Long-poll the config service for this gateway's config; apply each new version like an edited config file.

One background task runs the whole life:

1. **start-up**: one plain ``GET`` (bounded by ``startup_wait``). A version that arrives is applied (``/readyz``
   source ``config_service``). If the service is down, slow, has no config yet or sends one that fails, the last
   good copy in ``cache_dir`` is served (source ``cache``); with no usable copy either the gateway stays not ready
   (503) and keeps polling.
2. **polling**: ``GET /v1/services/{s}/config?wait=...`` with ``If-None-Match`` set to the ETag of the last version
   taken, exactly as the service sent it (applied or rejected, so a refused version is not sent again and again;
   the service's ETag carries a content hash, so a store restored to the same number with other content is not
   taken for the version held), and the report headers
   ``X-Meshgate-Gateway``, ``X-Meshgate-Applied-Version`` and, after a refusal, ``X-Meshgate-Rejected-Version`` /
   ``X-Meshgate-Rejected-Error``. A new version: download its bundles, compile ``bootstrap + pushed``, apply
   atomically, write the cache (``cache_dir/<service>/config.json``), then remove bundle files no config uses any
   more. One that fails to compile or load is rejected (``store.rejected``) and the old one keeps serving.
3. **failures**: an unreachable service, a 5xx, an unreadable answer or a refused token (401/403, logged as
   ``config_service_auth_failed``) back off with full jitter (0.5 s doubling to 30 s), so a fleet that lost the
   service together does not come back in step. Anything unexpected (a full disk) backs off the same way, logged
   with its traceback: the poll task never ends but by ``stop``. An answer with nothing new that comes back early
   (304, or a 200 carrying the ETag already taken) is followed by a short jittered pause.

A second task re-fetches the serving version's bundles every ``bundle_refresh`` with ``If-None-Match``
(``bundles.py``). A changed bundle is a new file (bundles are stored by content), and the serving version is applied
again pointing at it, through the same compile and apply path as a new version: one that does not load is rejected
and reported like a bad version, the old file and policy stay, and that bundle is not tried again until it changes.

The token is read from ``token_file`` for every request (a rotated token is used at once) and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import structlog

from gateway.config.bootstrap import Bootstrap, Compiled, compile_pushed, merge, read_token
from gateway.config.errors import ConfigError, Problem
from gateway.config.sources.answers import ServiceUnavailable, check_status
from gateway.config.sources.bundles import BundleRefresher, BundleStore
from gateway.config.sources.cache import CACHE_FILE, CacheError, read_cached, service_dir, write_cached
from gateway.config.store import SnapshotStore
from gateway.config.values import format_duration
from gateway.resilience.backoff import full_jitter

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "STARTUP_WAIT",
    "RemoteSource",
    "ServiceUnavailable",
    "default_gateway_id",
    "poll_headers",
]

log = structlog.get_logger("meshgate.config")

# Seconds a starting gateway waits for the service before serving its cached copy.
STARTUP_WAIT = 10.0
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
# A long-poll that ends without news is normal; one that ends much sooner than asked (a service without long-poll,
# or a service with no config yet for this one) must not become a busy loop: a short, growing, jittered pause.
_EARLY_CAP = 5.0
# On top of the long-poll's wait, for the service's answer to travel.
_POLL_SLACK = 10.0
_REJECTED_ERROR_MAX = 300
_HEADER_UNSAFE = re.compile(r"[^\x20-\x7e]")
_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class _ReportNow(Exception):
    """A parked poll was cut short: there is something new to report."""


@dataclass(frozen=True, slots=True)
class _Version:
    version: int
    etag: str
    pushed: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class _Serving:
    """The version serving, as this source applied it: enough to apply it again with other bundle files."""

    version: int
    etag: str
    pushed: Mapping[str, Any]
    source: str
    bundles: tuple[tuple[str, str], ...]  # (where, name) of the pushed bundles
    digests: Mapping[str, str]  # name -> sha256 of the file applied


def default_gateway_id(service: str, hostname: str, port: int) -> str:
    """``<service>-<hostname>-<listen port>``: stable across restarts, unique per sidecar on a host."""
    host = _HOST_UNSAFE.sub("-", hostname.split(".", 1)[0]) or "host"
    return f"{service}-{host}-{port}"[:128]


def poll_headers(gateway_id: str, applied: int, rejected: tuple[int, str] | None) -> dict[str, str]:
    """The report every poll carries (pure). ``rejected``: the last version refused and its first problem."""
    headers = {"X-Meshgate-Gateway": gateway_id, "X-Meshgate-Applied-Version": str(applied)}
    if rejected is not None:
        version, error = rejected
        headers["X-Meshgate-Rejected-Version"] = str(version)
        # One header line: printable ASCII only, bounded (an error may quote the offending value).
        headers["X-Meshgate-Rejected-Error"] = _HEADER_UNSAFE.sub("?", error)[:_REJECTED_ERROR_MAX]
    return headers


class RemoteSource:
    """The config source of a gateway started from a bootstrap file. ``start`` in a running loop, ``stop`` at exit."""

    def __init__(
        self,
        bootstrap: Bootstrap,
        store: SnapshotStore,
        rng: random.Random,
        *,
        startup_wait: float = STARTUP_WAIT,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        hostname: str | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._settings = settings = bootstrap.settings
        self._store = store
        self._rng = rng
        self._startup_wait = startup_wait
        self._backoff = (backoff_base, backoff_cap)
        snapshot = bootstrap.snapshot
        self.gateway_id = settings.gateway_id or default_gateway_id(
            snapshot.service, hostname if hostname is not None else socket.gethostname(), snapshot.listen.port
        )
        self._config_url = f"{settings.url}/v1/services/{urllib.parse.quote(snapshot.service, safe='')}/config"
        # This service's own part of cache_dir: sidecars of other services may share the directory.
        self._dir = service_dir(settings.cache_dir, snapshot.service)
        self.source = f"config_service:{settings.url}"
        self.cache_source = f"cache:{self._dir / CACHE_FILE}"
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._report = asyncio.Event()  # a refusal (or its end) to tell the service before the parked poll ends
        self._bundles = BundleStore(settings.url, self._dir, self._session_now, self._headers)
        # The poller and the refresher both apply: one at a time, each checking what serves once it holds the lock.
        self._apply_lock = asyncio.Lock()
        # What the service has been told, and what the next poll asks relative to.
        self.applied = 0
        self.rejected: tuple[int, str] | None = None
        self._etag: str | None = None  # of the last version taken, applied or rejected: sent back as it came
        self._serving: _Serving | None = None
        self._cached_digests: Mapping[str, str] = {}  # the bundle files config.json names: never removed
        self._refresher = BundleRefresher(
            self._bundles, settings.bundle_refresh, lambda: self._serving, self._apply_bundles
        )
        # Serving the cached copy: the next poll asks without If-None-Match, so the service confirms (or replaces)
        # it at once and /readyz stops saying "cache" as soon as the service is back.
        self._from_cache = False
        self.first_attempt_done = asyncio.Event()  # the start-up step finished (tests and logs wait on it)

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def _session_now(self) -> aiohttp.ClientSession:
        assert self._session is not None, "start() first"
        return self._session

    def start(self) -> None:
        # trust_env=False: an HTTP(S)_PROXY meant for the user's traffic must not reroute the control plane.
        self._session = aiohttp.ClientSession(trust_env=False, timeout=aiohttp.ClientTimeout(total=None))
        self._tasks = [asyncio.create_task(self._run()), asyncio.create_task(self._refresher.run())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def reload(self) -> None:
        """SIGHUP: poll now instead of finishing a backoff pause (the bootstrap itself is read at start only)."""
        self._wake.set()

    # --- the poll loop ------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        await self._start_up()
        self.first_attempt_done.set()
        await self._poll_forever()

    async def _start_up(self) -> None:
        # The wait bounds the fetch and the bundle downloads, never ``store.apply``: a cancellation in the middle of
        # an apply could leave the upstream or policy runtimes half switched to a version that is not serving.
        deadline = asyncio.get_running_loop().time() + self._startup_wait
        try:
            async with asyncio.timeout_at(deadline):
                answer = await self._fetch(None)
            if answer is not None:
                await self._take(answer, deadline=deadline)
            else:
                log.info("config_service_no_config", service=self._bootstrap.snapshot.service)
        except TimeoutError:
            log.warning("config_service_slow", waited_s=self._startup_wait, url=self._settings.url)
        except ServiceUnavailable as error:
            self._log_unavailable(error, None)
        except Exception:  # as in the poll loop: never the end of the task, the cache and the polls still follow
            log.exception("config_start_up_failed", gateway=self.gateway_id)
        if self._store.current is None:
            await self._serve_cache()
        if self._store.current is None:
            log.warning("config_not_ready", reason="no version from the config service and no cached copy yet")

    async def _poll_forever(self) -> None:
        failures = early = 0
        while True:
            started = time.monotonic()
            try:
                confirm, wait = self._from_cache, self._settings.poll_wait
                answer = await self._fetch_or_report(None if confirm else wait)
                self._from_cache = False
                if answer is not None and not confirm and answer.etag == self._etag:
                    # A 200 for the version already taken (a proxy that dropped If-None-Match, a service without
                    # long-poll): no news, and paced like a 304 that came back early, not re-polled at once.
                    answer = None
                if answer is not None:
                    await self._take(answer)
                failures = 0
            except _ReportNow:
                continue  # asked again at once, carrying the new report
            except Exception as error:
                # Anything else (a full disk under cache_dir, a bug) must not end the task: a gateway that stops
                # polling keeps serving but never follows the service again.
                delay = full_jitter(failures, *self._backoff, self._rng)
                failures += 1
                if isinstance(error, ServiceUnavailable):
                    self._log_unavailable(error, delay)
                else:
                    log.exception("config_poll_failed", gateway=self.gateway_id, retry_in_s=round(delay, 3))
                await self._pause(delay)
                continue
            if answer is None and time.monotonic() - started < self._settings.poll_wait / 2:
                await self._pause(full_jitter(early, self._backoff[0], _EARLY_CAP, self._rng))
                early += 1
            else:
                early = 0

    async def _fetch_or_report(self, wait: float | None) -> _Version | None:
        """``_fetch``, cut short by ``_ReportNow`` when the refresher refused (or then took) bundles while the poll
        was parked: the service hears of it now, not a long-poll later. Cutting a poll changes nothing here."""
        self._report.clear()
        fetch = asyncio.ensure_future(self._fetch(wait))
        report = asyncio.ensure_future(self._report.wait())
        try:
            await asyncio.wait((fetch, report), return_when=asyncio.FIRST_COMPLETED)
        finally:
            report.cancel()
            if not fetch.done():
                fetch.cancel()
                await asyncio.gather(fetch, return_exceptions=True)
        if fetch.cancelled():
            raise _ReportNow
        return fetch.result()

    async def _pause(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _log_unavailable(self, error: ServiceUnavailable, retry_in: float | None) -> None:
        event = "config_service_auth_failed" if error.auth else "config_service_unreachable"
        fields: dict[str, Any] = {"url": self._settings.url, "gateway": self.gateway_id, "error": str(error)}
        if retry_in is not None:
            fields["retry_in_s"] = round(retry_in, 3)
        if error.auth:
            log.error(event, **fields, token_file=self._settings.token_file)
        else:
            log.warning(event, **fields)

    # --- one version --------------------------------------------------------------------------------------------

    async def _take(self, answer: _Version, *, deadline: float | None = None) -> None:
        """Apply ``answer`` or reject it. ``ServiceUnavailable`` (a bundle could not be fetched), or ``TimeoutError``
        when the downloads outlast ``deadline`` (loop time), leaves it untaken: the next poll asks for it again."""
        try:
            compiled = compile_pushed(self._bootstrap, answer.pushed)
            async with asyncio.timeout_at(deadline):
                digests = await self._download(compiled)
            async with self._apply_lock:
                await self._store.apply(compiled.with_bundles(digests), self.source, version=answer.version)
                serving = _Serving(answer.version, answer.etag, answer.pushed, self.source, compiled.bundles, digests)
                self._serving = serving
                self.applied, self.rejected, self._etag = answer.version, None, answer.etag
                await self._write_cache(serving)
        except ConfigError as error:
            self._store.rejected(f"{self.source} version {answer.version}", error)
            self.rejected = (answer.version, str(error.problems[0]))
            self._etag = answer.etag
            return

    async def _serve_cache(self) -> None:
        service = self._bootstrap.snapshot.service
        path = self._dir / CACHE_FILE
        try:
            cached = await asyncio.to_thread(read_cached, self._dir, service)
        except CacheError as error:
            log.error("config_cache_unusable", error=str(error))
            return
        if cached is None:
            return
        if cached.url is not None and cached.url != self._settings.url:
            # Still this service's config (the file says so): usable, but worth a look (a moved or a wrong URL).
            log.warning("config_cache_other_url", path=str(path), cached_url=cached.url, url=self._settings.url)
        try:
            compiled = compile_pushed(self._bootstrap, cached.pushed)
            missing = [
                Problem(w, f"{path} names no file for bundle {n!r}")
                for w, n in compiled.bundles
                if n not in cached.bundles
            ]
            if missing:
                raise ConfigError(missing)
            snapshot = compiled.with_bundles(cached.bundles)
            async with self._apply_lock:
                await self._store.apply(snapshot, self.cache_source, version=cached.version)
                self._serving = _Serving(
                    cached.version, cached.etag, cached.pushed, self.cache_source, compiled.bundles, cached.bundles
                )
        except ConfigError as error:
            # The bootstrap changed since (a key the cached version now clashes with), or a bundle file is gone.
            self._store.rejected(self.cache_source, error)
            return
        self.applied, self._etag, self._cached_digests = cached.version, cached.etag, cached.bundles
        self._bundles.remember(cached.bundles)
        self._from_cache = True
        log.info("config_from_cache", version=cached.version, path=str(path))

    async def _write_cache(self, serving: _Serving) -> None:
        """Write ``config.json`` for ``serving`` (just applied), then remove the bundle files neither it nor the
        file on disk names (the old file stays while a failed write leaves the old ``config.json`` naming it)."""
        merged = merge(self._bootstrap.document, serving.pushed)
        head = (self._bootstrap.snapshot.service, self._settings.url, serving.version, serving.etag)
        try:
            await asyncio.to_thread(write_cached, self._dir, *head, serving.pushed, merged, serving.digests)
            self._cached_digests = serving.digests
        except OSError as error:  # serving goes on; only a restart without the service would miss the copy
            log.error("config_cache_write_failed", path=str(self._dir), error=str(error))
        await self._bundles.prune(serving.digests, self._cached_digests)

    # --- HTTP ---------------------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        try:
            token = read_token(self._settings.token_file)
        except ConfigError as error:
            raise ServiceUnavailable(str(error.problems[0]), auth=True) from None
        return {"Authorization": f"Bearer {token}"}

    async def _fetch(self, wait: float | None) -> _Version | None:
        """The service's config if newer than the last taken (``None``: 304, or no config for this service yet).
        ``wait`` ``None``: answer at once (start-up)."""
        assert self._session is not None
        headers = {**self._headers(), **poll_headers(self.gateway_id, self.applied, self.rejected)}
        params: dict[str, str] = {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0)
        if wait is not None:
            headers["If-None-Match"] = self._etag or '"0"'
            params["wait"] = format_duration(wait)
            timeout = aiohttp.ClientTimeout(total=wait + _POLL_SLACK, sock_connect=5.0)
        try:
            async with self._session.get(self._config_url, headers=headers, params=params, timeout=timeout) as answer:
                if answer.status in (304, 404):
                    return None
                check_status(answer.status)
                body = await answer.json(content_type=None)
                return _parse_version(body, answer.headers.get("ETag"))
        except (aiohttp.ClientError, OSError, ValueError) as error:
            raise ServiceUnavailable(f"{type(error).__name__}: {error}".rstrip(": ")) from None
        except TimeoutError:
            if wait is None:
                raise  # the start-up bound
            raise ServiceUnavailable("no answer within the long-poll's time") from None

    async def _download(self, compiled: Compiled) -> dict[str, str]:
        return {name: await self._bundles.fetch(where, name) for where, name in compiled.bundles}

    async def _apply_bundles(self, serving: _Serving, digests: dict[str, str]) -> bool:
        """The refresher found new bundle files: apply the serving version again pointing at them. A new snapshot
        (its hash covers the files), so the policy runtime rebuilds the changed decision paths in one apply; one
        that does not load is rejected and reported like a bad version, and the old files keep deciding."""
        async with self._apply_lock:
            if self._serving is not serving:
                return True  # another version (or the service confirming the cache) was applied meanwhile
            try:
                snapshot = compile_pushed(self._bootstrap, serving.pushed).with_bundles(digests)
                await self._store.apply(snapshot, serving.source, version=serving.version)
            except ConfigError as error:
                self._store.rejected(f"{serving.source} version {serving.version} with new bundles", error)
                self.rejected = (serving.version, str(error.problems[0]))
                self._report.set()
                return False
            self._serving = replace(serving, digests=digests)
            if self.rejected is not None and self.rejected[0] <= serving.version:
                self.rejected = None  # that refusal was of these bundles: the version now serves with good ones
                self._report.set()
            log.info("bundles_applied", version=serving.version, bundles=digests)
            await self._write_cache(self._serving)
            return True


def _parse_version(body: object, etag: str | None) -> _Version:
    if not isinstance(body, Mapping):
        raise ServiceUnavailable("unexpected answer: not a JSON object")
    version, config = body.get("version"), body.get("config")
    if not isinstance(version, int) or isinstance(version, bool) or not isinstance(config, Mapping):
        raise ServiceUnavailable("unexpected answer: no integer version or no config object")
    return _Version(version, etag or f'"{version}"', config)
