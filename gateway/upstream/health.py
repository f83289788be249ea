"""Active HTTP health checks for one cluster's endpoints.

``HealthCounter`` is the pure half: consecutive results against the current state decide a transition
(``unhealthy_threshold`` failures in a row mark an endpoint unhealthy, ``healthy_threshold`` successes in a row mark
it healthy again), as Envoy's health checker does.

``HealthChecker`` is the I/O shell. Every ``interval`` (jittered by +-10% so the replicas of a fleet do not probe in
lockstep) it sends ``GET http(s)://<endpoint><path>`` to each endpoint, with its own ``timeout``, and sets
``endpoint.healthy`` on each transition. Decisions, and why:

* **2xx is a success**, anything else (other statuses, refused, reset, timeout) a failure. Envoy accepts only 200 by
  default; services commonly answer 204 from a health endpoint, and a redirect or 4xx is never "serving".
* **New endpoints start healthy** (Envoy starts them unhealthy until their first check). A config reload or DNS
  refresh must never blackhole a cluster while its first round of checks is under way; a dead endpoint is marked
  unhealthy after ``unhealthy_threshold`` checks, and passive failure handling (retries, breaker, outlier ejection)
  covers the gap. An ``Endpoint`` object that survived a reload keeps the state it already had.
* **The first round runs at once** on ``start()``, so a dead endpoint is found within ``unhealthy_threshold - 1``
  intervals rather than after a full extra one.
* **Every check is its own task**: a slow endpoint only holds its own check (bounded by ``timeout``) and never
  delays the others or the schedule. An endpoint whose previous check is still running (``timeout > interval``)
  is skipped for that round instead of piling up probes.
* **The endpoint set is read afresh each round** (DNS may change it): counters of endpoints that left are dropped,
  and a result that arrives for an endpoint no longer in the set is ignored.

The checks share whatever ``session`` the caller passes. The cluster's own pool works, but under saturation
(``max_connections`` all busy) a check would wait for a connection and could time out: pass a small dedicated
session if the pool may run full.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Iterable

import aiohttp
import structlog

from gateway.config.snapshot import HealthCheck
from gateway.upstream.state import Endpoint

__all__ = ["HEADERS", "JITTER", "HealthChecker", "HealthCounter", "OnHealthChange", "jittered"]

HEADERS = {"user-agent": "meshgate-health-check", "x-meshgate-health-check": "1"}
JITTER = 0.1  # +-10% of the interval
_DRAIN_LIMIT = 64 * 1024  # read at most this much of a health response; a longer body just closes the connection

OnHealthChange = Callable[[Endpoint, bool], None]

_log = structlog.get_logger("meshgate.health")


def jittered(interval: float, rng: random.Random) -> float:
    """``interval`` scaled by a uniform factor in ``[1 - JITTER, 1 + JITTER]``."""
    return interval * (1.0 + rng.uniform(-JITTER, JITTER))


class HealthCounter:
    """Consecutive-result thresholds for one endpoint. Pure.

    Only results that disagree with the current state count; one agreeing result resets the streak.
    """

    __slots__ = ("_healthy_threshold", "_streak", "_unhealthy_threshold", "healthy")

    def __init__(self, unhealthy_threshold: int, healthy_threshold: int, *, healthy: bool = True) -> None:
        if unhealthy_threshold < 1 or healthy_threshold < 1:
            raise ValueError("health check thresholds must be >= 1")
        self._unhealthy_threshold = unhealthy_threshold
        self._healthy_threshold = healthy_threshold
        self.healthy = healthy
        self._streak = 0  # consecutive results contrary to ``healthy``

    def observe(self, ok: bool) -> bool | None:
        """Record one check result; the new state if it caused a transition, else None."""
        if ok == self.healthy:
            self._streak = 0
            return None
        self._streak += 1
        threshold = self._healthy_threshold if ok else self._unhealthy_threshold
        if self._streak < threshold:
            return None
        self.healthy = ok
        self._streak = 0
        return ok


class _Tracked:
    __slots__ = ("counter", "endpoint", "task")

    def __init__(self, endpoint: Endpoint, counter: HealthCounter) -> None:
        self.endpoint = endpoint
        self.counter = counter
        self.task: asyncio.Task[None] | None = None


class HealthChecker:
    """Checks one cluster's endpoints in the background. ``start()`` in a running loop; ``await stop()``.

    ``endpoints`` is called once per round and returns the current endpoint set. ``on_change(endpoint, healthy)``
    runs on the event loop after ``endpoint.healthy`` was set by a transition (e.g. to log, count, or rebuild a
    balancer); an exception in it is logged and does not stop the checks.
    """

    def __init__(
        self,
        cluster_name: str,
        settings: HealthCheck,
        session: aiohttp.ClientSession,
        endpoints: Callable[[], Iterable[Endpoint]],
        on_change: OnHealthChange | None = None,
        *,
        rng: random.Random | None = None,
        scheme: str = "http",
        server_hostname: str | None = None,
    ) -> None:
        if settings.interval <= 0 or settings.timeout <= 0:
            raise ValueError("health check interval and timeout must be positive")
        HealthCounter(settings.unhealthy_threshold, settings.healthy_threshold)  # validate thresholds now
        self._cluster = cluster_name
        self._settings = settings
        self._session = session
        self._endpoints = endpoints
        self._on_change = on_change
        self._rng = rng or random.Random()
        path = settings.path if settings.path.startswith("/") else "/" + settings.path
        self._path = path
        self._scheme = scheme  # "https" for a cluster with tls: the check goes over the cluster's TLS context
        self._server_hostname = server_hostname
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout)
        self._tracked: dict[str, _Tracked] = {}
        self._checks: set[asyncio.Task[None]] = set()  # every check in flight, those of departed endpoints too
        self._task: asyncio.Task[None] | None = None

    @property
    def settings(self) -> HealthCheck:
        return self._settings

    def start(self) -> None:
        """Check every endpoint now, then every (jittered) ``interval``. Idempotent."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"health:{self._cluster}")

    async def stop(self) -> None:
        """Cancel the schedule and every check in flight, and wait for them to end."""
        task, self._task = self._task, None
        tasks = [*([task] if task is not None else []), *self._checks]
        self._tracked = {}
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _run(self) -> None:
        while True:
            self._round()
            await asyncio.sleep(jittered(self._settings.interval, self._rng))

    def _round(self) -> None:
        """Start a check for every current endpoint that has none in flight; forget endpoints that left."""
        try:
            current = list(self._endpoints())
        except Exception:
            _log.exception("health_check_endpoints_failed", upstream=self._cluster)
            return
        tracked: dict[str, _Tracked] = {}
        for endpoint in current:
            entry = self._tracked.get(endpoint.key)
            if entry is None or entry.endpoint is not endpoint:
                # A new object (or one replaced on reload) starts from the state it carries: True when fresh.
                counter = HealthCounter(
                    self._settings.unhealthy_threshold, self._settings.healthy_threshold, healthy=endpoint.healthy
                )
                entry = _Tracked(endpoint, counter)
            tracked[endpoint.key] = entry
            if entry.task is None:
                entry.task = asyncio.get_running_loop().create_task(
                    self._check(entry), name=f"health:{self._cluster}:{endpoint.key}"
                )
                self._checks.add(entry.task)
                entry.task.add_done_callback(self._checks.discard)
        # Checks still running for endpoints that left are left to finish; _check ignores their result.
        self._tracked = tracked

    async def _check(self, entry: _Tracked) -> None:
        try:
            reason = await self._probe(entry.endpoint)
        finally:
            entry.task = None
        if self._tracked.get(entry.endpoint.key) is not entry:
            return  # the endpoint left the set (or the checker stopped) while it was being checked
        changed = entry.counter.observe(reason is None)
        if changed is None:
            return
        entry.endpoint.healthy = changed
        (_log.info if changed else _log.warning)(
            "health_check_transition",
            upstream=self._cluster,
            endpoint=entry.endpoint.key,
            healthy=changed,
            reason=reason or "ok",
        )
        if self._on_change is not None:
            try:
                self._on_change(entry.endpoint, changed)
            except Exception:
                _log.exception("health_check_on_change_failed", upstream=self._cluster, endpoint=entry.endpoint.key)

    async def _probe(self, endpoint: Endpoint) -> str | None:
        """One GET; None when it succeeded, else a short reason for the log."""
        url = f"{self._scheme}://{endpoint.address}{self._path}"
        try:
            async with self._session.get(
                url,
                headers=HEADERS,
                timeout=self._timeout,
                allow_redirects=False,
                server_hostname=self._server_hostname,
            ) as response:
                # Drain a small body so the keep-alive connection can be reused; more than that is not worth it.
                drained = 0
                async for chunk in response.content.iter_chunked(16 * 1024):
                    drained += len(chunk)
                    if drained > _DRAIN_LIMIT:
                        break
                return None if 200 <= response.status < 300 else f"status {response.status}"
        except TimeoutError:
            return "timeout"
        except (aiohttp.ClientError, OSError) as exc:
            return type(exc).__name__
        except Exception:
            _log.exception("health_check_error", upstream=self._cluster, endpoint=endpoint.key)
            return "error"
