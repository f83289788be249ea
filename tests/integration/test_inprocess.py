"""The gateway wired in-process (server, store, pipeline) against a real upstream on loopback.

Faster than the e2e tests and able to read the metrics registry directly: checks that a reload swaps routes and
pools atomically, that metrics and local replies line up, and that a request pins the snapshot it started with.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from gateway.app import build_pipeline
from gateway.config.compile import compile_document
from gateway.config.store import SnapshotStore
from gateway.server import GatewayServer
from gateway.serving import Serving
from gateway.stages.ratelimit import RateLimitStage
from gateway.upstream.clusters import Upstreams
from telemetry.access_log import AccessLog
from telemetry.metrics import Metrics
from telemetry.tracing import Tracer
from tests.procs import free_port


@dataclass
class Stack:
    server: GatewayServer
    store: SnapshotStore
    metrics: Metrics
    url: str
    upstream_port: int

    def document(self, routes: list[dict[str, object]]) -> dict[str, object]:
        return {
            "service": "t",
            "listen": self.url.removeprefix("http://"),
            "routes": routes,
            "clusters": [{"name": "up", "endpoints": [f"127.0.0.1:{self.upstream_port}"]}],
            "telemetry": {"logs": {"access_log": False}},
        }


async def _upstream_app() -> web.Application:
    release = asyncio.Event()

    async def slow(_: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="slow done")

    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=request.path)

    async def go(_: web.Request) -> web.Response:
        release.set()
        return web.Response(text="released")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/release", go)
    app.router.add_get("/{tail:.*}", echo)
    return app


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    upstream_port = free_port()
    upstream = web.AppRunner(await _upstream_app())
    await upstream.setup()
    await web.TCPSite(upstream, "127.0.0.1", upstream_port).start()
    metrics = Metrics()
    rng = random.Random(1)
    server = GatewayServer(build_pipeline(metrics, rng, AccessLog(), RateLimitStage(metrics), Tracer()), metrics)
    upstreams = Upstreams(rng, grace=0.5, metrics=metrics)

    def publish(serving: Serving) -> None:
        server.serving = serving

    store = SnapshotStore(upstreams, metrics, publish)
    port = free_port()
    s = Stack(server, store, metrics, f"http://127.0.0.1:{port}", upstream_port)
    await store.apply(compile_document(s.document([{"name": "all", "cluster": "up"}])), "test")
    await server.start("127.0.0.1", port, reuse_port=False)
    try:
        yield s
    finally:
        await server.stop(drain_timeout=1.0)
        await upstreams.close()
        await upstream.cleanup()


def _sample(metrics: Metrics, name: str, labels: dict[str, str]) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_local_reply_is_counted_and_measured(stack: Stack) -> None:
    await stack.store.apply(
        compile_document(stack.document([{"name": "only-a", "match": {"path": "/a"}, "cluster": "up"}])), "t"
    )
    async with aiohttp.ClientSession() as client, client.get(f"{stack.url}/b") as response:
        body = await response.json()
        assert response.status == 404
    assert body["error"] == "route_not_found"
    assert body["request_id"] == response.headers["x-request-id"]
    assert (
        _sample(stack.metrics, "meshgate_local_replies_total", {"http_route": "unmatched", "reason": "route_not_found"})
        == 1
    )
    assert (
        _sample(
            stack.metrics,
            "http_server_request_duration_seconds_count",
            {"http_request_method": "GET", "http_route": "unmatched", "http_response_status_code": "404"},
        )
        == 1
    )


async def test_request_finishes_on_the_snapshot_it_started_with(stack: Stack) -> None:
    async with aiohttp.ClientSession() as client:
        slow = asyncio.create_task(client.get(f"{stack.url}/slow"))
        await asyncio.sleep(0.2)  # the slow request is now in flight on version 1
        # Version 2 removes the route the slow request matched; new requests must see v2 at once.
        await stack.store.apply(
            compile_document(stack.document([{"name": "only-x", "match": {"path": "/x"}, "cluster": "up"}])), "t"
        )
        async with client.get(f"{stack.url}/slow") as refused:
            assert refused.status == 404
        async with client.get(f"{stack.url}/release") as released:
            assert released.status == 404  # /release is not routed in v2 either: release the upstream directly
        async with client.get(f"http://127.0.0.1:{stack.upstream_port}/release") as direct:
            assert direct.status == 200
        response = await slow
        assert response.status == 200
        assert await response.text() == "slow done"
        response.release()
    assert stack.store.current is not None
    assert stack.store.current.snapshot.version == 2


async def test_client_attempt_metrics_per_upstream(stack: Stack) -> None:
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.get(f"{stack.url}/hello") as response:
                assert response.status == 200
                assert await response.text() == "/hello"
    count = _sample(
        stack.metrics,
        "http_client_request_duration_seconds_count",
        {"http_request_method": "GET", "upstream": "up", "http_response_status_code": "200", "error_type": ""},
    )
    assert count == 3
