"""The admin port: liveness, readiness, metrics, the serving config and upstream status.

A separate listener from the proxy so probes and scrapes never compete with, or get routed like, user traffic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from gateway.serving import Serving
from telemetry.metrics import Metrics

__all__ = ["AdminState", "build_admin_app"]


class AdminState:
    """What the admin endpoints report: flipped by the lifecycle in ``app.py``."""

    def __init__(self) -> None:
        self.draining = False


def build_admin_app(state: AdminState, serving: Callable[[], Serving | None], metrics: Metrics) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        current = serving()
        if state.draining:
            return web.json_response({"status": "draining"}, status=503)
        if current is None:
            return web.json_response({"status": "no config loaded"}, status=503)
        return web.json_response({"status": "ready", "version": current.snapshot.version})

    async def metrics_page(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(metrics.registry), headers={"Content-Type": content_type})

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
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/config", config)
    app.router.add_get("/status/upstreams", upstreams)
    return app
