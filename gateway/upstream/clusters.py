"""Runtime handles of upstream clusters: endpoints, balancer, pool, discovery, health and failure accounting.

Config is data, runtime is handles: a ``ClusterRuntime`` is built from a ``config.snapshot.Cluster`` and lives
across reloads, keyed by cluster name, so per-endpoint state (in-flight counts, latency estimates) and warm
keep-alive connections survive a config swap. ``Upstreams.apply`` reconciles the set with a new snapshot; a cluster
that disappears, or whose pool settings change, is retired and its pool closed only after a grace period, so
requests still running on the old snapshot finish. A cluster with ``tls`` gets its own ``SSLContext`` on its connector
(and its health checker's); new TLS settings or certificate contents mean a new pool, like new pool settings.

Discovery (DNS, or the config service's instance registry) feeds the same ``_set_endpoints``: an endpoint that
disappears is only dropped from the balancer, so requests already on it finish. The registry client is a process
handle (it knows the config service's address and token, which a cluster's config does not), so ``Upstreams`` is
given it once and passes it to every runtime.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Iterable, Iterator, Mapping

import aiohttp
import structlog

from gateway.config.snapshot import Address, Cluster, EndpointSpec
from gateway.mesh.connector import MeshConnector
from gateway.mesh.runtime import Mesh
from gateway.resilience.breaker import STATE_VALUES, Admission
from gateway.resilience.retry import RetryBudget
from gateway.tls.contexts import ClientTls
from gateway.upstream.balancer import Balancer, build_balancer
from gateway.upstream.discovery import DnsResolver, reconcile
from gateway.upstream.health import HealthChecker
from gateway.upstream.outlier import OutlierDetector
from gateway.upstream.registry import InstanceSource, RegistryWatcher
from gateway.upstream.state import Endpoint, panic_mode
from telemetry.metrics import Metrics, StateRow

__all__ = ["ClusterRuntime", "Upstreams"]

log = structlog.get_logger("meshgate.upstream")

# How long applying a config waits for a registry cluster's first instance list. A reachable config service answers
# at once; an unreachable one must not hold a reload (or start-up) for long: the cluster then starts empty (503)
# and fills in the moment the registry answers.
_REGISTRY_READY_TIMEOUT = 5.0

# Headers aiohttp would add on its own; the gateway forwards exactly what the client sent instead.
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def _connector(spec: Cluster, tls: ClientTls | None, mesh: Mesh | None, limit: int) -> aiohttp.TCPConnector:
    if spec.mesh_identity is not None:
        if mesh is None:
            raise ValueError(f"cluster {spec.name!r} has a mesh_identity but the gateway has no mesh certificate")
        # Each new connection takes the mesh's newest client context, and checks the peer's identity.
        return MeshConnector(
            mesh, spec.mesh_identity, limit=limit, limit_per_host=0, ttl_dns_cache=None, enable_cleanup_closed=False
        )
    return aiohttp.TCPConnector(
        limit=limit,
        limit_per_host=0,
        ttl_dns_cache=None,  # endpoints are IP literals or resolved by DnsResolver, never per request
        enable_cleanup_closed=False,
        # The cluster's own context (its CA, client certificate, hardened defaults); plain clusters never use TLS.
        ssl=tls.context if tls is not None else False,
    )


def _new_session(spec: Cluster, tls: ClientTls | None, mesh: Mesh | None) -> aiohttp.ClientSession:
    connector = _connector(spec, tls, mesh, spec.max_connections)
    session = aiohttp.ClientSession(
        connector=connector,
        # total=None: the gateway bounds attempts itself (route deadline); bodies may stream for a long time.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=spec.connect_timeout, connect=spec.connect_timeout),
        auto_decompress=False,  # pass compressed bodies through untouched
        skip_auto_headers=_SKIP_AUTO_HEADERS,
        cookie_jar=aiohttp.DummyCookieJar(),  # cookies belong to the client, never stored by the proxy
        raise_for_status=False,
    )
    # aiohttp silently re-sends an idempotent request once after a reset on a reused connection. That hidden
    # attempt escaped the route's retry policy, budget, metrics and `attempts` (even with attempts: 1); retries
    # are the gateway's decision alone. No public switch exists in aiohttp 3.14 (pinned).
    session._retry_connection = False
    return session


class ClusterRuntime:
    """One cluster's live state. Mutated only from the event loop."""

    def __init__(
        self,
        spec: Cluster,
        rng: random.Random,
        metrics: Metrics,
        registry: InstanceSource | None = None,
        tls: ClientTls | None = None,
        mesh: Mesh | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self._rng = rng
        self._metrics = metrics
        self.endpoints: dict[str, Endpoint] = {}
        self.balancer: Balancer = build_balancer(spec.lb, rng)
        if spec.tls is not None and tls is None:
            raise ValueError(f"cluster {spec.name!r} has tls settings but no TLS context was built for it")
        self.tls = tls
        self._mesh = mesh
        # What every attempt, WebSocket and health check to this cluster uses: https with the configured SNI name
        # (None: the endpoint's address, checked against the certificate's IP SANs). A mesh cluster's endpoints
        # are checked by identity instead (mesh/connector.py).
        self.scheme = "https" if tls is not None or spec.mesh_identity is not None else "http"
        self.server_hostname = spec.tls.server_name if spec.tls is not None else None
        self.session = _new_session(spec, tls, mesh)
        self.admission = Admission(spec.circuit_breaker)
        self.budget = _budget(spec)
        self.outlier = OutlierDetector(spec.outlier_detection) if spec.outlier_detection else None
        self.panic = False  # fewer healthy endpoints than the panic threshold: health is ignored (Envoy)
        # Ejections count against the panic threshold too, but end by the clock, not by an event: panic is
        # recomputed by the first pick after the earliest ejection ends (bug fix: it used to follow health
        # transitions only, so a panic decided while an endpoint was ejected outlived the ejection).
        self._panic_until = math.inf
        self._registry = registry
        self._resolver: DnsResolver | None = None
        self._watcher: RegistryWatcher | None = None
        self._health: HealthChecker | None = None
        self._health_session: aiohttp.ClientSession | None = None
        self._start_discovery()
        self._start_health()

    # --- per request -------------------------------------------------------------------------------------------

    def pick(self, hash_key: str | None, now: float, avoid: Endpoint | None) -> Endpoint | None:
        """An endpoint for one attempt. When nothing is usable, spread over all endpoints whose breaker admits
        (Envoy's panic mode at 0% healthy) rather than failing every request on stale health information."""
        if now >= self._panic_until:  # an ejection ended since panic was last decided
            self._update_panic(now)
        endpoint = self.balancer.pick(hash_key, now, avoid, panic=self.panic)
        if endpoint is None and not self.panic:
            endpoint = self.balancer.pick(hash_key, now, avoid, panic=True)
        return endpoint

    def all_tripped(self, now: float) -> bool:
        """True when endpoints exist but every breaker refuses (503 circuit_open rather than no_healthy_upstream)."""
        return bool(self.endpoints) and not any(e.breaker.admits(now) for e in self.endpoints.values())

    def record(self, endpoint: Endpoint, failed: bool, now: float) -> tuple[str, ...]:
        """Feed one attempt's outcome to the endpoint's breaker and to outlier detection.

        Returns what it changed (``breaker.tripped``, ``outlier.ejected``), for the attempt's span events.
        """
        changed: tuple[str, ...] = ()
        if failed:
            trips = endpoint.breaker.trips
            endpoint.breaker.record_failure(now, self._rng)
            if endpoint.breaker.trips != trips:
                changed = ("breaker.tripped",)
        else:
            endpoint.breaker.record_success(now)
        if self.outlier is not None and self.outlier.record(endpoint, failed, now, self.endpoints.values()):
            changed += ("outlier.ejected",)
            self._metrics.outlier_ejections.labels(self.name).inc()
            log.warning(
                "endpoint_ejected",
                upstream=self.name,
                endpoint=endpoint.key,
                until_in_s=round(endpoint.ejected_until - now, 3),
                times_ejected=endpoint.times_ejected,
            )
            self._update_panic(now)  # bug fix: one endpoint fewer may cross the panic threshold
        return changed

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def _start_health(self) -> None:
        settings = self.spec.health_check
        if settings is None:
            return
        # Probes get their own small pool: behind a saturated data-plane pool they would time out and mark live
        # endpoints unhealthy exactly when it hurts most.
        self._health_session = aiohttp.ClientSession(
            connector=_connector(self.spec, self.tls, self._mesh, 16),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._health = HealthChecker(
            self.name,
            settings,
            self._health_session,
            lambda: tuple(self.endpoints.values()),
            self._on_health_change,
            rng=self._rng,
            scheme=self.scheme,
            server_hostname=self.server_hostname,
        )
        self._health.start()

    async def _stop_health(self) -> None:
        if self._health is not None:
            await self._health.stop()
            self._health = None
        if self._health_session is not None:
            await self._health_session.close()
            self._health_session = None

    def _on_health_change(self, _endpoint: Endpoint, _healthy: bool) -> None:
        self._update_panic()  # the checker itself logs the transition (health_check_transition)

    def _update_panic(self, now: float | None = None) -> None:
        settings = self.spec.health_check
        if now is None:
            now = asyncio.get_running_loop().time()
        endpoints = tuple(self.endpoints.values())
        panic = settings is not None and panic_mode(endpoints, settings.panic_threshold, now)
        # The next time this decision may change without a health or ejection event: the earliest ejection's end.
        self._panic_until = min((e.ejected_until for e in endpoints if e.ejected_until > now), default=math.inf)
        if panic != self.panic:
            log.warning("panic_mode", upstream=self.name, panic=panic)
        self.panic = panic

    def _start_discovery(self) -> None:
        # Until a new source answers, the endpoints of the previous one (if any) keep serving: no gap on a switch.
        if self.spec.dns is not None:
            self._resolver = DnsResolver(self.spec.dns, self._on_dns_change, upstream=self.name)
            self._resolver.start()
        elif self.spec.registry is not None:
            if self._registry is None:
                # The compiler refuses a registry cluster without a config_service section; getting here means the
                # app did not pass the client it built from that section. Loud, and the cluster answers 503.
                log.error("registry_client_missing", upstream=self.name, service=self.spec.registry.service)
                return
            self._watcher = RegistryWatcher(
                self.spec.registry, self._registry, self._on_registry_change, upstream=self.name, rng=self._rng
            )
            self._watcher.start()
        else:
            self._set_endpoints(self.spec.endpoints)

    async def _stop_discovery(self) -> None:
        if self._resolver is not None:
            await self._resolver.stop()
            self._resolver = None
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None

    def _on_dns_change(self, addresses: tuple[Address, ...]) -> None:
        log.info("dns_endpoints_changed", upstream=self.name, endpoints=[str(a) for a in addresses])
        self._set_endpoints(addresses)

    def _on_registry_change(self, addresses: tuple[Address, ...]) -> None:
        assert self.spec.registry is not None
        log.info(
            "registry_endpoints_changed",
            upstream=self.name,
            service=self.spec.registry.service,
            endpoints=[str(a) for a in addresses],
        )
        self._set_endpoints(addresses)

    def _set_endpoints(self, wanted: Iterable[Address | EndpointSpec]) -> None:
        # Existing Endpoint objects are kept (their state survives); a request already holding a dropped endpoint
        # keeps using it to the end, so nothing in flight is cut.
        self.endpoints = reconcile(self.endpoints, wanted, self.name)
        for endpoint in self.endpoints.values():
            endpoint.breaker.reconfigure(self.spec.circuit_breaker)  # new ones get the cluster's settings
        self.balancer.update(tuple(self.endpoints.values()))
        self._update_panic()

    async def ready(self) -> None:
        """Wait for the first DNS answer (bounded by the resolver's timeout) or registry list (bounded by
        ``_REGISTRY_READY_TIMEOUT``); at once for static endpoints.

        Without it a discovered cluster served its first requests, right after /readyz said 200 or a reload swapped
        it in, with no endpoints at all (503 no_healthy_upstream) until the background answer landed.
        """
        if self._resolver is not None and self._resolver.addresses is None:
            await self._resolver.refresh()  # concurrent with the task's own first refresh: the later one is a no-op
        if self._watcher is not None and self._watcher.addresses is None:
            try:
                async with asyncio.timeout(_REGISTRY_READY_TIMEOUT):
                    await self._watcher.answered()
            except TimeoutError:
                assert self.spec.registry is not None
                log.warning("registry_not_ready", upstream=self.name, service=self.spec.registry.service)

    @property
    def in_flight(self) -> int:
        return sum(endpoint.in_flight for endpoint in self.endpoints.values())

    def pool_settings_changed(self, spec: Cluster, tls: ClientTls | None = None) -> bool:
        """Does ``spec`` (with its TLS context, if any) need a new pool? New TLS settings or file contents do:
        the pool's connections were made with the old ones."""
        if (spec.connect_timeout, spec.max_connections) != (self.spec.connect_timeout, self.spec.max_connections):
            return True
        if spec.mesh_identity != self.spec.mesh_identity:
            return True  # the pool's connections were checked against the old identity (or were not mesh at all)
        fingerprint = tls.fingerprint if tls is not None else None
        return fingerprint != (self.tls.fingerprint if self.tls is not None else None)

    async def update(self, spec: Cluster) -> None:
        """Apply a changed spec whose pool settings are unchanged (see ``pool_settings_changed``)."""
        old = self.spec
        self.spec = spec
        if spec.lb != old.lb:
            self.balancer = build_balancer(spec.lb, self._rng)
            self.balancer.update(tuple(self.endpoints.values()))
        if (spec.dns, spec.registry, spec.endpoints) != (old.dns, old.registry, old.endpoints):
            await self._stop_discovery()
            self._start_discovery()
        if spec.circuit_breaker != old.circuit_breaker:
            self.admission.reconfigure(spec.circuit_breaker)
            for endpoint in self.endpoints.values():
                endpoint.breaker.reconfigure(spec.circuit_breaker)  # state (trips, failures) is kept
        if spec.outlier_detection != old.outlier_detection:
            if spec.outlier_detection is None:
                self.outlier = None
            elif self.outlier is None:
                self.outlier = OutlierDetector(spec.outlier_detection)
            else:
                self.outlier.reconfigure(spec.outlier_detection)
        if spec.retry_budget != old.retry_budget:
            self.budget = _budget(spec)
        if spec.health_check != old.health_check:
            await self._stop_health()
            self._start_health()
            self._update_panic()

    async def close(self) -> None:
        await self._stop_discovery()
        await self._stop_health()
        await self.session.close()


def _budget(spec: Cluster) -> RetryBudget:
    settings = spec.retry_budget
    return RetryBudget(settings.ratio, settings.min_per_second, settings.window)


class Upstreams:
    """The live set of ClusterRuntimes, reconciled against each new snapshot.

    ``registry``: the config service's instance registry (``registry.RegistryClient``), for clusters with
    ``discovery: {registry: ...}``; ``None`` when the gateway has no ``config_service`` section. Not closed here:
    whoever built it closes it, after ``close()``.
    """

    def __init__(
        self,
        rng: random.Random,
        grace: float,
        metrics: Metrics,
        registry: InstanceSource | None = None,
        mesh: Mesh | None = None,
    ) -> None:
        self._rng = rng
        self._mesh = mesh  # the mesh certificate's handle, for clusters with mesh_identity
        self._metrics = metrics
        self._registry = registry
        self._grace = grace  # how long a retired pool stays open for requests still on the old snapshot
        self._live: dict[str, ClusterRuntime] = {}
        self._retiring: dict[asyncio.Task[None], ClusterRuntime] = {}

    @property
    def live(self) -> Mapping[str, ClusterRuntime]:
        return self._live

    def breaker_rows(self) -> Iterator[StateRow]:
        """``meshgate_circuit_breaker_state`` samples, read at scrape time."""
        now = asyncio.get_running_loop().time()
        for name, runtime in self._live.items():
            for endpoint in runtime.endpoints.values():
                yield (name, endpoint.key), STATE_VALUES[endpoint.breaker.state_at(now)]

    def endpoint_rows(self) -> Iterator[StateRow]:
        """``meshgate_upstream_endpoints`` samples by state (ejected wins over unhealthy), read at scrape time."""
        now = asyncio.get_running_loop().time()
        for name, runtime in self._live.items():
            counts = {"healthy": 0, "unhealthy": 0, "ejected": 0}
            for endpoint in runtime.endpoints.values():
                state = "ejected" if endpoint.ejected_at(now) else "healthy" if endpoint.healthy else "unhealthy"
                counts[state] += 1
            for state, count in counts.items():
                yield (name, state), count

    async def apply(
        self, clusters: Mapping[str, Cluster], tls: Mapping[str, ClientTls] | None = None
    ) -> dict[str, ClusterRuntime]:
        """Return the runtimes for ``clusters``, reusing live ones; retire what is no longer needed.

        ``tls``: the client context of each cluster with ``tls`` (``tls.contexts.upstream_contexts``), built from the
        files as they are now; a cluster whose context differs from its pool's gets a new pool."""
        tls = tls or {}
        fresh: dict[str, ClusterRuntime] = {}
        for name, spec in clusters.items():
            runtime = self._live.get(name)
            context = tls.get(name)
            if runtime is None:
                runtime = ClusterRuntime(spec, self._rng, self._metrics, self._registry, context, self._mesh)
            elif runtime.pool_settings_changed(spec, context):
                self._retire(runtime)
                runtime = ClusterRuntime(spec, self._rng, self._metrics, self._registry, context, self._mesh)
            elif runtime.spec != spec:
                await runtime.update(spec)
            fresh[name] = runtime
        for name, runtime in self._live.items():
            if fresh.get(name) is not runtime:
                self._retire(runtime)
        self._live = fresh
        await asyncio.gather(*(runtime.ready() for runtime in fresh.values()))
        return dict(fresh)

    def _retire(self, runtime: ClusterRuntime) -> None:
        async def later() -> None:
            # Requests pinned to the old snapshot may not have picked an endpoint yet: wait the grace period,
            # then for the last in-flight request on this pool (a long download must not be cut by a reload).
            await asyncio.sleep(self._grace)
            while runtime.in_flight:  # noqa: ASYNC110 - counts live in pure endpoint state; 1 s polls cost nothing
                await asyncio.sleep(1.0)
            await runtime.close()

        task = asyncio.create_task(later())
        self._retiring[task] = runtime
        task.add_done_callback(lambda t: self._retiring.pop(t, None))

    async def close(self) -> None:
        """Close every pool now, retiring ones included (shutdown: nothing is in flight any more)."""
        runtimes = [*self._retiring.values(), *self._live.values()]
        for task in list(self._retiring):
            task.cancel()
        for runtime in runtimes:
            await runtime.close()
        self._live = {}
