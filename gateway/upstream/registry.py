"""Registry discovery: follow a service's instances in the config service's instance registry.

Three parts, mirroring DNS discovery (``discovery.py``):

- ``parse_instances`` (pure): a ``GET /v1/services/{s}/instances`` body -> ``InstanceList`` (version and the sorted,
  de-duplicated addresses). Malformed instances are skipped and named, never fatal: one bad registration must not
  freeze the whole fleet's list.
- ``RegistryClient`` (the I/O shell, one per gateway, built by the app from the bootstrap's ``config_service``
  section): ``watch(service)`` long-polls the list (``If-None-Match`` + ``?wait=``) and yields the address set on
  every answer. A registry that cannot be reached, refuses the token, or answers garbage yields nothing: the last
  known list stays in force (a control-plane blink must not drop a fleet), and polls back off with full jitter.
  With a ``cache_dir`` (the gateway's ``cache_dir/<service>``), every changed list is written to
  ``instances/<registry service>.json``, and a watch whose first poll fails yields that cached list once: a gateway
  restarted while the control plane is down routes to the last known instances instead of answering 503.
- ``RegistryWatcher`` (one per cluster): consumes ``watch`` in a background task and calls ``on_change`` when the
  set differs from the last one reported, exactly as ``DnsResolver`` does, so ``ClusterRuntime`` reconciles both
  the same way. Unlike DNS, an *answered* empty list is reported: the registry saying "no instances" is the truth
  (every one expired or left), and the cluster then has no endpoints (503 no_healthy_upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
import structlog

from gateway.config.errors import ConfigError
from gateway.config.snapshot import Address, RegistryDiscovery
from gateway.config.sources.cache import CacheError, read_instances, write_instances
from gateway.config.values import format_duration, parse_address
from gateway.resilience.backoff import full_jitter

__all__ = [
    "InstanceList",
    "InstanceSource",
    "OnChange",
    "RegistryClient",
    "RegistryError",
    "RegistryWatcher",
    "parse_instances",
]

OnChange = Callable[[tuple[Address, ...]], None]

_log = structlog.get_logger(__name__)


class InstanceSource(Protocol):
    """The seam ``ClusterRuntime`` depends on; ``RegistryClient`` is the real one, tests pass fakes."""

    def watch(self, service: str) -> AsyncIterator[tuple[Address, ...]]:
        """Yield ``service``'s address set (sorted, no duplicates) on every answer; run until cancelled."""
        ...


class RegistryError(ValueError):
    """The registry answered something that is not an instance list (or an unexpected status)."""


@dataclass(frozen=True, slots=True)
class InstanceList:
    """One registry answer: its ``version`` (the ETag's K), the usable addresses, and what was skipped and why."""

    version: int
    addresses: tuple[Address, ...]  # sorted by (host, port), no duplicates: a stable balancer order
    skipped: tuple[str, ...] = ()  # "instance <id>: <problem>", for the log


def parse_instances(body: object) -> InstanceList:
    """``{"version": K, "instances": [{"id", "address": "host:port", "expires_at"}, ...]}`` -> ``InstanceList``.

    Raises ``RegistryError`` when the envelope is wrong (not a mapping, no integer version, no instance list): such
    an answer says nothing trustworthy, so the caller keeps its last list. A single malformed instance is skipped.
    """
    if not isinstance(body, Mapping):
        raise RegistryError("expected a JSON object")
    version = body.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise RegistryError(f"expected an integer version >= 0, got {version!r}")
    instances = body.get("instances")
    if not isinstance(instances, list):
        raise RegistryError("expected an instances list")
    found: set[Address] = set()
    skipped: list[str] = []
    for index, instance in enumerate(instances):
        ident = instance.get("id", f"#{index}") if isinstance(instance, Mapping) else f"#{index}"
        raw = instance.get("address") if isinstance(instance, Mapping) else None
        if not isinstance(raw, str):
            skipped.append(f"instance {ident}: no address string")
            continue
        try:
            found.add(parse_address(raw))
        except ValueError as exc:
            skipped.append(f"instance {ident}: {exc}")
    return InstanceList(version, _sorted(found), tuple(skipped))


def _sorted(addresses: set[Address]) -> tuple[Address, ...]:
    return tuple(sorted(addresses, key=lambda a: (a.host, a.port)))


class RegistryClient:
    """The gateway's handle on the config service's instance registry. Create it in a running loop; ``await
    close()`` at exit (it closes ``session`` only if it made it).

    ``base_url`` is ``config_service.url`` (e.g. ``http://127.0.0.1:7000``); ``token`` the gateway token, or a
    function returning it (the app reads ``config_service.token_file`` on every poll, as the config poller does, so a
    rotated token is used at once; a ``ConfigError`` from it counts as a failed poll). One long-poll connection is
    held per watched cluster, so the own session's pool is unbounded (a cap would starve watches beyond it); a
    passed-in ``session`` should allow as many connections. ``cache_dir``: where the last list of each watched
    service is kept (``None``: nowhere, and nothing to start from when the registry is unreachable).
    """

    def __init__(
        self,
        base_url: str,
        token: str | Callable[[], str],
        session: aiohttp.ClientSession | None = None,
        *,
        wait: float = 30.0,
        rng: random.Random | None = None,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        min_interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        cache_dir: Path | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._token = token
        self._session = session
        self._owns_session = session is None
        self._wait = wait
        self._rng = rng if rng is not None else random.Random()
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap  # the config service's own clients use 0.5 s doubling to 30 s as well
        # Polls of one watch start at least this far apart: a server that answers at once (ignores the wait, or
        # a proxy in between strips If-None-Match) must not turn the watch into a busy loop.
        self._min_interval = min_interval
        self._clock = clock
        # The whole long-poll, plus slack for a slow answer; beyond it the connection is presumed dead.
        self._timeout = aiohttp.ClientTimeout(total=wait + 10.0, sock_connect=5.0)
        self._cache_dir = cache_dir
        self._written: dict[str, tuple[Address, ...]] = {}  # per service: the list on disk (skip unchanged writes)

    def url(self, service: str) -> str:
        return f"{self._base}/v1/services/{urllib.parse.quote(service, safe='')}/instances"

    async def fetch(self, service: str, etag: str | None = None) -> tuple[str, InstanceList] | None:
        """One poll: ``(etag, list)`` on a new answer, ``None`` when nothing changed (304) within the wait.

        Without ``etag`` the registry answers at once. Raises ``RegistryError``, ``aiohttp.ClientError`` or
        ``TimeoutError`` when there is no usable answer.
        """
        try:
            token = self._token() if callable(self._token) else self._token
        except ConfigError as exc:  # the token file is unreadable or empty now: retried like any failed poll
            raise RegistryError(str(exc.problems[0])) from None
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        params: dict[str, str] = {}
        if etag is not None:
            headers["If-None-Match"] = etag
            params["wait"] = format_duration(self._wait)
        session = self._session_now()
        async with session.get(self.url(service), headers=headers, params=params, timeout=self._timeout) as answer:
            if answer.status == 304:
                return None
            if answer.status != 200:
                text = (await answer.text(errors="replace"))[:200]
                raise RegistryError(f"HTTP {answer.status}: {text}")
            try:
                body = await answer.json(content_type=None)
            except ValueError as exc:  # json.JSONDecodeError
                raise RegistryError(f"invalid JSON: {exc}") from exc
            listing = parse_instances(body)
            return answer.headers.get("ETag") or f'"{listing.version}"', listing

    async def watch(self, service: str) -> AsyncIterator[tuple[Address, ...]]:
        """Yield ``service``'s addresses at once, then after every change; never ends or raises but by cancellation.

        Failures are logged and retried with full-jitter backoff; nothing is yielded for them, so the consumer keeps
        the last list. After a failure the next poll asks without ``If-None-Match`` (answered at once), so the list
        is re-synchronised the moment the registry is back, not a long-poll later.
        """
        etag: str | None = None
        failures = 0
        answered = False  # by the registry, or by the cache: the cache seeds a watch once, never after an answer
        while True:
            started = self._clock()
            try:
                answer = await self.fetch(service, etag)
            except (aiohttp.ClientError, TimeoutError, RegistryError) as exc:
                delay = full_jitter(failures, self._backoff_base, self._backoff_cap, self._rng)
                failures += 1
                etag = None
                _log.warning(
                    "registry_watch_failed",
                    service=service,
                    error=str(exc) or repr(exc),
                    failures=failures,
                    retry_in_s=round(delay, 3),
                )
                if not answered:
                    answered = True
                    cached = await self._read_cache(service)
                    if cached is not None:
                        yield cached
                await asyncio.sleep(delay)
                continue
            if failures:
                _log.info("registry_watch_recovered", service=service, after_failures=failures)
                failures = 0
            if answer is not None:
                etag, listing = answer
                answered = True
                if listing.skipped:
                    _log.warning("registry_instances_skipped", service=service, skipped=list(listing.skipped))
                await self._write_cache(service, listing)
                yield listing.addresses
            idle = self._min_interval - (self._clock() - started)
            if idle > 0:
                await asyncio.sleep(idle)

    async def _read_cache(self, service: str) -> tuple[Address, ...] | None:
        if self._cache_dir is None or not _file_safe(service):
            return None
        try:
            raw = await asyncio.to_thread(read_instances, self._cache_dir, service)
        except CacheError as exc:
            _log.error("registry_cache_unusable", service=service, error=str(exc))
            return None
        if raw is None:
            return None
        found: set[Address] = set()
        for text in raw:
            with contextlib.suppress(ValueError):
                found.add(parse_address(text))
        addresses = _sorted(found)
        self._written.setdefault(service, addresses)
        _log.warning("registry_from_cache", service=service, endpoints=[str(a) for a in addresses])
        return addresses

    async def _write_cache(self, service: str, listing: InstanceList) -> None:
        if self._cache_dir is None or not _file_safe(service) or self._written.get(service) == listing.addresses:
            return
        texts = [str(address) for address in listing.addresses]
        try:
            await asyncio.to_thread(write_instances, self._cache_dir, service, self._base, listing.version, texts)
        except OSError as exc:  # the watch goes on; only a restart without the registry would miss the list
            _log.error("registry_cache_write_failed", service=service, path=str(self._cache_dir), error=str(exc))
            return
        self._written[service] = listing.addresses

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Made on first use, inside the running loop (aiohttp binds a session to the loop that creates it).
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar()
            )
        return self._session

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None


def _file_safe(service: str) -> bool:
    # The compiler checks registry names as service names; a caller of watch() may pass anything.
    return service not in ("", ".", "..") and all(ch.isalnum() or ch in "._-" for ch in service)


class RegistryWatcher:
    """Keeps one cluster's registry-discovered address set current. ``start()`` in a running loop; ``await stop()``.

    ``on_change`` runs on the event loop with the new set, sorted; ``upstream`` (the cluster name) labels the logs.
    """

    def __init__(
        self,
        spec: RegistryDiscovery,
        source: InstanceSource,
        on_change: OnChange,
        *,
        upstream: str = "",
        rng: random.Random | None = None,
        restart_base: float = 0.5,
        restart_cap: float = 30.0,
    ) -> None:
        self._spec = spec
        self._source = source
        self._on_change = on_change
        self._upstream = upstream or spec.service
        self._rng = rng if rng is not None else random.Random()
        self._restart_base = restart_base
        self._restart_cap = restart_cap
        self._addresses: tuple[Address, ...] | None = None
        self._answered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def addresses(self) -> tuple[Address, ...] | None:
        """The last set reported through ``on_change`` (sorted), or None before the first answer."""
        return self._addresses

    def start(self) -> None:
        """Watch in a background task. Idempotent."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"registry:{self._upstream}")

    async def stop(self) -> None:
        """Cancel the watch and wait for it to end."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def answered(self) -> None:
        """Return once a list has been reported (at once if one has); bound it with ``asyncio.timeout``."""
        await self._answered.wait()

    def offer(self, found: tuple[Address, ...]) -> None:
        """Take one answer: call ``on_change`` if the set differs from the last one reported (or is the first)."""
        addresses = _sorted(set(found))
        if addresses == self._addresses:
            return
        try:
            self._on_change(addresses)
        except Exception:
            # Not recorded as current, so the next answer offers the same set again.
            _log.exception("registry_on_change_failed", upstream=self._upstream, service=self._spec.service)
            return
        self._addresses = addresses  # logging the change is on_change's job: it knows what it did with it
        self._answered.set()

    async def _run(self) -> None:
        restarts = 0
        while True:
            try:
                async for found in self._source.watch(self._spec.service):
                    restarts = 0
                    self.offer(found)
                _log.error("registry_watch_ended", upstream=self._upstream, service=self._spec.service)
            except Exception:
                # A source is meant never to raise; if one does, the cluster keeps its list and the watch restarts.
                _log.exception("registry_watch_error", upstream=self._upstream, service=self._spec.service)
            await asyncio.sleep(full_jitter(restarts, self._restart_base, self._restart_cap, self._rng))
            restarts += 1
