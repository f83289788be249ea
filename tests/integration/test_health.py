"""HealthChecker against real aiohttp upstreams on loopback: transitions within thresholds x interval.

Intervals are 50 ms so each test takes well under a second or two; the bounds allow the +-10% jitter plus a margin
for a busy 2-core machine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.config.snapshot import Address, HealthCheck
from gateway.upstream.health import JITTER, HealthChecker
from gateway.upstream.state import Endpoint
from tests.procs import free_port

INTERVAL = 0.05
MARGIN = 0.25  # scheduling slack on a loaded machine


class Upstream:
    """A controllable health endpoint: answer ``status`` after ``delay`` seconds; records what it received."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.status = 200
        self.delay = 0.0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.arrivals: list[float] = []  # monotonic time of each request
        self.in_flight = 0
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.port)

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, {k.lower(): v for k, v in request.headers.items()}))
        self.arrivals.append(time.monotonic())
        self.in_flight += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            return web.Response(status=self.status, text="ok")
        finally:
            self.in_flight -= 1

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[[], Upstream]]:
    made: list[Upstream] = []

    def make() -> Upstream:
        made.append(Upstream())
        return made[-1]

    yield make
    for upstream in made:
        await upstream.stop()


async def started(upstream: Upstream) -> Upstream:
    await upstream.start()
    return upstream


BASE = HealthCheck(path="/healthz", interval=INTERVAL, timeout=0.5, unhealthy_threshold=3, healthy_threshold=2)


def settings(**overrides: Any) -> HealthCheck:
    return dataclasses.replace(BASE, **overrides)


def bound(checks: int, interval: float = INTERVAL) -> float:
    """Longest time ``checks`` consecutive checks may take, jitter and scheduling slack included."""
    return checks * interval * (1 + JITTER) + MARGIN


async def wait_until(predicate: Callable[[], bool], within: float) -> float:
    """Poll ``predicate`` every 5 ms; the seconds it took to hold. Fails the test after ``within`` seconds."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            pytest.fail(f"condition not met within {within:.2f}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


class Changes:
    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def __call__(self, endpoint: Endpoint, healthy: bool) -> None:
        assert endpoint.healthy is healthy  # set before the callback runs
        self.seen.append((endpoint.key, healthy))


def checker(
    session: aiohttp.ClientSession,
    endpoints: list[Endpoint],
    changes: Changes | None = None,
    **overrides: Any,
) -> HealthChecker:
    return HealthChecker("c", settings(**overrides), session, lambda: endpoints, changes, rng=random.Random(1))


async def test_status_flips_drive_transitions_within_thresholds(
    session: aiohttp.ClientSession, upstreams: Callable[[], Upstream]
) -> None:
    up = await started(upstreams())
    endpoint = Endpoint("c", up.address)
    changes = Changes()
    hc = checker(session, [endpoint], changes)
    hc.start()
    try:
        await asyncio.sleep(4 * INTERVAL)
        assert endpoint.healthy is True
        assert changes.seen == []

        up.status = 500
        took = await wait_until(lambda: not endpoint.healthy, bound(3))
        # Not on the first or second failure: three checks are at least two full (jittered) intervals apart.
        assert took >= 2 * INTERVAL * (1 - JITTER) - 0.01
        assert changes.seen == [(endpoint.key, False)]

        up.status = 200
        took = await wait_until(lambda: endpoint.healthy, bound(2))
        assert took >= INTERVAL * (1 - JITTER) - 0.01
        assert changes.seen == [(endpoint.key, False), (endpoint.key, True)]
    finally:
        await hc.stop()


async def test_stopped_upstream_goes_unhealthy_and_recovers_on_restart(
    session: aiohttp.ClientSession, upstreams: Callable[[], Upstream]
) -> None:
    up = await started(upstreams())
    endpoint = Endpoint("c", up.address)
    hc = checker(session, [endpoint])
    hc.start()
    try:
        await asyncio.sleep(2 * INTERVAL)
        await up.stop()  # connection refused from now on
        await wait_until(lambda: not endpoint.healthy, bound(3))
        await up.start()  # same port
        await wait_until(lambda: endpoint.healthy, bound(2))
    finally:
        await hc.stop()


async def test_first_check_runs_at_start(session: aiohttp.ClientSession) -> None:
    endpoint = Endpoint("c", Address("127.0.0.1", free_port()))  # nothing listens there
    hc = checker(session, [endpoint], interval=30.0, unhealthy_threshold=1)
    hc.start()
    try:
        await wait_until(lambda: not endpoint.healthy, 1.0)  # long before the first 30 s interval ends
    finally:
        await hc.stop()


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (204, True), (299, True), (301, False), (404, False)])
async def test_any_2xx_is_a_success(
    session: aiohttp.ClientSession, upstreams: Callable[[], Upstream], status: int, healthy: bool
) -> None:
    up = await started(upstreams())
    up.status = status
    endpoint = Endpoint("c", up.address)
    hc = checker(session, [endpoint], unhealthy_threshold=1)
    hc.start()
    try:
        await wait_until(lambda: len(up.requests) >= 3, bound(3))
        await asyncio.sleep(0.02)  # let the third result land
        assert endpoint.healthy is healthy
    finally:
        await hc.stop()


async def test_sends_path_and_identifying_headers(
    session: aiohttp.ClientSession, upstreams: Callable[[], Upstream]
) -> None:
    up = await started(upstreams())
    hc = checker(session, [Endpoint("c", up.address)], path="/ready")
    hc.start()
    try:
        await wait_until(lambda: len(up.requests) >= 1, 1.0)
    finally:
        await hc.stop()
    path, headers = up.requests[0]
    assert path == "/ready"
    assert headers["user-agent"] == "meshgate-health-check"
    assert headers["x-meshgate-health-check"] == "1"


async def test_slow_endpoint_never_delays_the_others(
    session: aiohttp.ClientSession, upstreams: Callable[[], Upstream]
) -> None:
    slow, fast = await started(upstreams()), await started(upstreams())
    slow.delay = 30.0  # hangs far beyond the check timeout
    slow_ep, fast_ep = Endpoint("c", slow.address), Endpoint("c", fast.address)
    changes = Changes()
    hc = checker(session, [slow_ep, fast_ep], changes, timeout=0.3)
    hc.start()
    try:
        await asyncio.sleep(2 * INTERVAL)
        fast.status = 500
        # The fast endpoint's three failures take ~3 intervals, not ~3 slow-check timeouts.
        await wait_until(lambda: not fast_ep.healthy, bound(3))
        assert slow_ep.healthy is True  # its first check has not even timed out yet
        # The slow one fails by timeout: three timeouts, one at a time (a round skips an endpoint still in check).
        await wait_until(lambda: not slow_ep.healthy, 3 * 0.3 + bound(3))
        # Never two checks at once: each one starts only after the previous one timed out.
        gaps = [b - a for a, b in zip(slow.arrivals, slow.arrivals[1:], strict=False)]
        assert len(gaps) >= 2
        assert min(gaps) >= 0.3 - 0.01
        assert changes.seen == [(fast_ep.key, False), (slow_ep.key, False)]
    finally:
        await hc.stop()


async def test_tolerates_the_endpoint_set_changing(
    session: aiohttp.ClientSession, upstreams: Callable[[], Upstream]
) -> None:
    a, b = await started(upstreams()), await started(upstreams())
    ep_a, ep_b = Endpoint("c", a.address), Endpoint("c", b.address)
    endpoints = [ep_a]
    changes = Changes()
    hc = checker(session, endpoints, changes)
    hc.start()
    try:
        await wait_until(lambda: len(a.requests) >= 2, bound(2))
        assert b.requests == []

        b.status = 500
        endpoints.append(ep_b)  # a DNS refresh adds b: it starts healthy, then fails its checks
        assert ep_b.healthy is True
        await wait_until(lambda: not ep_b.healthy, bound(4))

        endpoints.remove(ep_a)  # ... and later drops a, which then starts failing: nobody cares any more
        await asyncio.sleep(2 * INTERVAL)
        a.status = 500
        seen_a = len(a.requests)
        await asyncio.sleep(6 * INTERVAL)
        assert len(a.requests) == seen_a  # no longer probed
        assert ep_a.healthy is True
        assert changes.seen == [(ep_b.key, False)]
    finally:
        await hc.stop()


async def test_an_endpoint_that_survived_a_reload_keeps_its_state(
    session: aiohttp.ClientSession, upstreams: Callable[[], Upstream]
) -> None:
    up = await started(upstreams())
    endpoint = Endpoint("c", up.address)
    endpoint.healthy = False  # marked down by the checker of the previous config
    hc = checker(session, [endpoint], healthy_threshold=3)
    hc.start()
    try:
        took = await wait_until(lambda: endpoint.healthy, bound(3))
        assert took >= 2 * INTERVAL * (1 - JITTER) - 0.01  # needed three successes, not one
    finally:
        await hc.stop()


async def test_stop_cancels_checks_in_flight_promptly(
    session: aiohttp.ClientSession, upstreams: Callable[[], Upstream]
) -> None:
    up = await started(upstreams())
    up.delay = 30.0
    endpoint = Endpoint("c", up.address)
    hc = checker(session, [endpoint], timeout=10.0)
    hc.start()
    await wait_until(lambda: up.in_flight == 1, 1.0)
    start = time.monotonic()
    await hc.stop()
    assert time.monotonic() - start < 0.2
    assert endpoint.healthy is True
    await hc.stop()  # idempotent


async def test_on_change_errors_do_not_stop_the_checks(
    session: aiohttp.ClientSession, upstreams: Callable[[], Upstream]
) -> None:
    up = await started(upstreams())
    endpoint = Endpoint("c", up.address)
    calls: list[bool] = []

    def explode(_: Endpoint, healthy: bool) -> None:
        calls.append(healthy)
        raise RuntimeError("boom")

    hc = HealthChecker("c", settings(unhealthy_threshold=1, healthy_threshold=1), session, lambda: [endpoint], explode)
    hc.start()
    try:
        up.status = 500
        await wait_until(lambda: not endpoint.healthy, bound(2))
        up.status = 200
        await wait_until(lambda: endpoint.healthy, bound(2))
        assert calls == [False, True]
    finally:
        await hc.stop()


async def test_stop_also_cancels_checks_of_departed_endpoints(
    session: aiohttp.ClientSession, upstreams: Callable[[], Upstream]
) -> None:
    up = await started(upstreams())
    up.delay = 30.0
    endpoints = [Endpoint("c", up.address)]
    hc = checker(session, endpoints, timeout=10.0)
    hc.start()
    await wait_until(lambda: up.in_flight == 1, 1.0)
    endpoints.clear()  # the endpoint leaves while its check hangs
    await asyncio.sleep(2 * INTERVAL)
    await hc.stop()
    await asyncio.sleep(0)
    assert [t for t in asyncio.all_tasks() if (t.get_name() or "").startswith("health:")] == []
