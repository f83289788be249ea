"""The admin port: liveness, readiness, metrics, the serving config and upstream status.

A separate listener from the proxy so probes and scrapes never compete with, or get routed like, user traffic.

Under ``--workers N`` every worker listens on the admin port and a scrape lands on any one of them, so ``/metrics``
answers for the whole group: each worker also serves its own registry on a unix socket (``PeerSet``), and the one
that takes the scrape fetches the others' over them and merges (``telemetry/metrics_merge.py``). The other endpoints
answer for the worker that takes the request. Without ``--workers`` ``/metrics`` is the plain local page.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import aiohttp
import structlog
from aiohttp import web
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from gateway.serving import Serving
from gateway.workers import PeerSet
from telemetry.metrics import Metrics
from telemetry.metrics_merge import merge_families, parse_openmetrics

__all__ = ["PEER_TIMEOUT", "AdminState", "build_admin_app", "source_kind"]

log = structlog.get_logger("meshgate.admin")

# Peers are always asked for OpenMetrics, whatever the scraper negotiated: only it carries exemplars, and _created
# as what it is. The merged families are then rendered in the scraper's format.
_OPENMETRICS = "application/openmetrics-text; version=1.0.0"
# Another process's event loop on the same machine answers in milliseconds; a second means it is wedged. Well within
# Prometheus's default 10 s scrape timeout.
PEER_TIMEOUT = aiohttp.ClientTimeout(total=1.0)


def source_kind(source: str) -> str:
    """``file:/etc/gw.yaml`` -> ``file``; ``config_service:http://...`` -> ``config_service``; ``cache:...`` ->
    ``cache``: a source is stamped ``<kind>:<where>`` by the config source that applied it."""
    return source.split(":", 1)[0]


class AdminState:
    """What the admin endpoints report: flipped by the lifecycle in ``app.py``."""

    def __init__(self) -> None:
        self.draining = False
        # Something else the gateway waits for before it can serve (the mesh certificate): a reason, or None.
        self.waiting_for: Callable[[], str | None] = lambda: None


def build_admin_app(
    state: AdminState, serving: Callable[[], Serving | None], metrics: Metrics, peers: PeerSet | None = None
) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        current = serving()
        # `source` says where the serving config came from: "file", "config_service", or "cache" (the last good
        # copy on disk, while the config service could not be reached). `version` is the config service's.
        source = source_kind(current.snapshot.source) if current is not None else None
        version = current.snapshot.version if current is not None else None
        body: dict[str, object] = {"ready": False, "source": source, "version": version}
        if state.draining:
            return web.json_response({"status": "draining", **body}, status=503)
        if current is None:
            return web.json_response({"status": "no config loaded", **body}, status=503)
        waiting = state.waiting_for()
        if waiting is not None:
            return web.json_response({"status": waiting, **body}, status=503)
        return web.json_response({"status": "ready", **body, "ready": True})

    async def local_metrics(request: web.Request) -> web.Response:
        """This process's registry: the whole gateway alone, one worker's share (on its socket) under workers."""
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(metrics.registry), headers={"Content-Type": content_type})

    async def group_metrics(request: web.Request) -> web.Response:
        assert peers is not None
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        try:
            pages = await _peer_pages(peers)
            # Collected here, on the loop: the state gauges read upstream state that only the loop may touch.
            own = list(metrics.registry.collect())
            # The OpenMetrics parser is pure Python (~35 us a line; ~0.3 s for a 9000-line page): parsing, merging
            # and encoding run in a thread, so the proxy keeps serving on this loop meanwhile.
            body, conflicts = await asyncio.to_thread(_merge_and_encode, own, pages, encoder)
        except _PeerUnavailable as failure:
            log.warning("metrics_peer_unavailable", reason=str(failure))
            return web.json_response({"error": "metrics_incomplete", "reason": str(failure)}, status=503)
        if conflicts:
            log.warning("metrics_type_conflict", families=sorted(set(conflicts)))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def config(_: web.Request) -> web.Response:
        current = serving()
        if current is None:
            return web.json_response({"error": "no config loaded"}, status=503)
        snap = current.snapshot
        return web.json_response(
            {
                "version": snap.version,
                "source": snap.source,
                "hash": snap.hash,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(snap.loaded_at)),
                "config": snap.document,
            }
        )

    async def upstreams(_: web.Request) -> web.Response:
        current = serving()
        if current is None:
            return web.json_response({"error": "no config loaded"}, status=503)
        now = asyncio.get_running_loop().time()
        body = {
            name: {
                "lb": runtime.spec.lb,
                # Envoy's panic mode: too few healthy endpoints, so health is ignored and traffic spread over all.
                "panic": runtime.panic,
                "active_requests": runtime.admission.active,
                "endpoints": [
                    {
                        "address": endpoint.key,
                        "weight": endpoint.weight,
                        "healthy": endpoint.healthy,
                        "ejected": endpoint.ejected_at(now),
                        "ejected_for_s": round(max(0.0, endpoint.ejected_until - now), 3),
                        "times_ejected": endpoint.times_ejected,
                        "breaker": endpoint.breaker.state_at(now),
                        "in_flight": endpoint.in_flight,
                    }
                    for endpoint in runtime.endpoints.values()
                ],
            }
            for name, runtime in current.clusters.items()
        }
        return web.json_response(body)

    app = web.Application()
    if peers is not None:  # bound with the admin port and closed with it, before it takes its first scrape
        app.cleanup_ctx.append(_peer_socket(local_metrics, peers))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", local_metrics if peers is None else group_metrics)
    app.router.add_get("/config", config)
    app.router.add_get("/status/upstreams", upstreams)
    return app


# --- /metrics under --workers -----------------------------------------------------------------------------------


class _PeerUnavailable(Exception):
    """A worker that is serving did not give its metrics (timeout, error, unreadable page)."""


class _Families:
    """A throwaway collector over already merged families, for prometheus_client's encoders."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def _peer_socket(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]], peers: PeerSet
) -> Callable[[web.Application], AsyncIterator[None]]:
    """An aiohttp cleanup context: ``handler`` (this worker's own registry) served on its socket in the group."""

    async def serve(_: web.Application) -> AsyncIterator[None]:
        app = web.Application()
        app.router.add_get("/metrics", handler)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            path = peers.socket_path(peers.index)
            await web.UnixSite(runner, path).start()
            log.info("metrics_socket", worker=peers.index, path=path)
            yield
        finally:
            await runner.cleanup()

    return serve


async def _peer_pages(peers: PeerSet) -> dict[int, str]:
    """Every other serving worker's own OpenMetrics page, by worker index; ``_PeerUnavailable`` if one fails.

    Why not skip a worker that fails: its counters would vanish from the sum for one scrape, and Prometheus reads
    any decrease as a counter reset, so ``rate()`` would show a spike of everything the worker ever counted. A 503
    is a missed scrape instead (``up == 0``), which ``rate()`` bridges. A worker whose socket does not exist yet is
    still starting and has served nothing: skipping it leaves every sum exact.
    """
    answers = await asyncio.gather(*(_peer_page(peers, i) for i in peers.others), return_exceptions=True)
    pages: dict[int, str] = {}
    for index, answer in zip(peers.others, answers, strict=True):
        if isinstance(answer, BaseException):  # _PeerUnavailable, or a bug here that aiohttp logs as a 500
            raise answer
        if answer is not None:
            pages[index] = answer
    return pages


async def _peer_page(peers: PeerSet, index: int) -> str | None:
    """Worker ``index``'s own page, or None while it is still starting (no socket yet)."""
    path = peers.socket_path(index)
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path), timeout=PEER_TIMEOUT) as session,
            session.get("http://worker/metrics", headers={"Accept": _OPENMETRICS}) as response,
        ):
            response.raise_for_status()
            return await response.text()
    except aiohttp.ClientConnectorError as error:
        if error.os_error.errno == errno.ENOENT:
            log.info("metrics_peer_not_started", worker=index)
            return None
        raise _PeerUnavailable(f"worker {index}: {error.os_error.strerror or error}") from error
    except (aiohttp.ClientError, TimeoutError) as error:
        raise _PeerUnavailable(f"worker {index}: {type(error).__name__} {error}".rstrip()) from error


def _merge_and_encode(
    own: list[Metric], pages: dict[int, str], encoder: Callable[[_Families], bytes]
) -> tuple[bytes, tuple[str, ...]]:
    """(The merged page in the scraper's format, names of families dropped for a type clash.) Runs in a thread."""
    sources = [own]
    for index, page in pages.items():
        try:
            sources.append(parse_openmetrics(page))
        except ValueError as error:
            raise _PeerUnavailable(f"worker {index}: unreadable metrics: {error}") from error
    merged = merge_families(sources)
    return encoder(_Families(merged.families)), merged.conflicts
