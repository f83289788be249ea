"""e2e: resilience under faults. Three real upstreams behind one real gateway, 8 concurrent GET loops, one fault.

Each test starts fresh processes (``bench.faults.rig``), runs one scenario of ``bench/faults.py`` for a few seconds
and asserts on its figures. Every time bound is derived from the config's timing knobs (``bench.faults.Settings``,
short on purpose: 200 ms health interval, 500 ms first trip, 1 s base ejection) plus ``SLACK`` for scheduling noise:
the load, the gateway and three upstreams share a 2-core machine. ``pytest -s`` prints each scenario's figures.

The last two tests are regressions for gateway bugs these scenarios turned up (see bench/RESULTS.md, "Resilience
under faults").
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

import aiohttp
import pytest

from bench.faults import (
    APP,
    Figures,
    Load,
    Rig,
    Settings,
    Upstream,
    delta,
    parse_metrics,
    rig,
    scenario_fail,
    scenario_kill,
    scenario_restore,
    scenario_slow,
    total,
    until,
)
from tests.procs import gateway

pytestmark = pytest.mark.e2e

SETTINGS = Settings()
CLIENTS = 8
WARMUP = 1.0  # seconds of healthy load before the fault
DURATION = 3.0  # seconds of load with the fault
SLACK = 0.5  # seconds of scheduling noise allowed on top of a bound derived from the config


@pytest.fixture
async def r(tmp_path: Path) -> AsyncIterator[Rig]:
    async with rig(tmp_path, SETTINGS) as running:
        yield running


def shown(figures: Figures) -> str:
    text = json.dumps(asdict(figures), indent=1)
    print(text)  # visible with -s; the same text is every assertion's message
    return text


async def test_killed_endpoint_costs_no_request_and_is_marked_down(r: Rig) -> None:
    f = await scenario_kill(r, SETTINGS, warmup=WARMUP, duration=DURATION, clients=CLIENTS)
    why = shown(f)
    assert f.requests > 500, why
    # In-flight requests were reset and new connections refused: retries on another endpoint answered them all.
    assert f.failed == 0, why
    assert f.extra["failed_before_kill"] == 0, why
    # Active checks: unhealthy_threshold failed checks, each within a jittered interval (+ the check's timeout).
    bound = SETTINGS.time_to_unhealthy() + SLACK
    assert f.extra["time_to_unhealthy_s"] is not None, why
    assert f.extra["time_to_unhealthy_s"] <= bound, why
    # Passive detection needs only consecutive_5xx failed attempts, which the load supplies long before that.
    assert f.time_to_eject_s is not None, why
    assert f.time_to_eject_s <= bound, why
    assert f.extra["ejections"] >= 1, why
    assert f.extra["dead_endpoint_at_end"]["healthy"] is False, why
    assert f.extra["panic_at_end"] is False, why  # two of three healthy: above the 50% panic threshold
    assert set(f.outcomes) == {"200 a", "200 b"}, why  # nothing reached the dead endpoint c


async def test_slow_endpoint_is_cut_by_the_per_try_timeout(r: Rig) -> None:
    f = await scenario_slow(r, SETTINGS, warmup=WARMUP, duration=DURATION, clients=CLIENTS)
    why = shown(f)
    assert f.requests > 500, why
    assert f.failed == 0, why  # no 504: each slow try was cut at per_try_timeout and retried elsewhere
    assert f.extra["per_try_timeouts"] >= 1, why  # the slow endpoint was tried, and timed out
    route_timeout_ms = SETTINGS.route_timeout * 1000
    assert f.p99_ms < route_timeout_ms, why
    # Even the unluckiest request (a per-try timeout, a backoff, a fast answer) stays far from the route deadline.
    assert f.max_ms < route_timeout_ms, why
    assert f.time_to_eject_s is not None, why  # consecutive timeouts count as gateway errors: ejected


async def test_all_endpoints_failing_trip_breakers_and_retries_stay_in_budget(r: Rig) -> None:
    f = await scenario_fail(r, SETTINGS, warmup=WARMUP, duration=DURATION, clients=CLIENTS)
    why = shown(f)
    extra = f.extra
    tripped_in = extra["time_to_all_tripped_s"]
    assert tripped_in is not None, why
    assert tripped_in <= SETTINGS.time_to_unhealthy() + SLACK, why
    assert extra["breaker_gauge_while_tripped"], why
    assert all(value >= 1 for value in extra["breaker_gauge_while_tripped"]), why  # 1 tripped, 2 probing
    # Answered at once with 503 (circuit_open, or the upstream's own 503 for a probe), no queueing.
    assert f.requests > 500, why
    assert all(outcome.startswith("503 ") for outcome in f.outcomes), why
    assert f.p99_ms < 100, why
    # Amplification = upstream attempts / client requests over the whole fault, seen by the gateway and upstreams.
    assert f.amplification is not None, why
    assert f.amplification < 1.3, why
    assert extra["amplification_upstream_counts"] < 1.3, why
    # Without breakers only the retry budget stands between 3 attempts per request and the upstreams: it allows
    # ratio (20%) of the requests plus min_per_second, and refuses the rest.
    assert extra["bare_requests"] > 100, why
    assert 1.05 < extra["bare_amplification"] < 1 + SETTINGS.budget_ratio + 0.1, why
    assert extra["bare_amplification_upstream_counts"] < 1.3, why
    assert extra["bare_budget_exhausted"] > 0, why


async def test_restored_endpoints_get_traffic_back_without_a_restart(r: Rig) -> None:
    bound = SETTINGS.time_to_return() + SLACK
    f = await scenario_restore(r, SETTINGS, warmup=WARMUP, duration=bound + 1.0, clients=CLIENTS)
    why = shown(f)
    assert f.extra["requests_while_down"] > 100, why
    assert f.time_to_recover_s is not None, why
    assert f.time_to_recover_s <= bound, why  # from then on every request answered 200
    for name, back_in in f.extra["time_back_per_endpoint_s"].items():
        assert back_in is not None, (name, why)
        assert back_in <= bound, (name, why)
    # The last second: all 200, spread over all three again (round robin: a third each).
    assert f.extra["last_second_requests"] > 100, why
    assert f.extra["last_second_failed"] == 0, why
    assert all(share >= 0.2 for share in f.extra["last_second_share"].values()), why
    for view in f.extra["endpoints_at_end"].values():
        assert view == {"healthy": True, "ejected": False, "breaker": "closed"}, why
    assert f.extra["panic_at_end"] is False, why


# --- regressions found while writing the scenarios above --------------------------------------------------------

# A longer ejection than SETTINGS, so the ejection surely outlasts the other endpoint's health transition.
LONG_EJECTION = Settings(base_ejection_time=2.0, max_ejection_time=4.0)


@pytest.fixture
async def r_long_ejection(tmp_path: Path) -> AsyncIterator[Rig]:
    async with rig(tmp_path, LONG_EJECTION) as running:
        yield running


async def test_panic_mode_ends_with_the_ejection_that_caused_it(r_long_ejection: Rig) -> None:
    """b is ejected (slow: per-try timeouts) when c dies and turns unhealthy: 1 of 3 usable, panic on. Once b is
    fine and its ejection over, 2 of 3 are usable again: panic must end, and the dead c gets no more attempts.
    (The gateway used to recompute panic on health transitions only, so it stayed on for good.)"""
    r = r_long_ejection
    _, b, c = r.upstreams
    async with Load(r.url(APP), CLIENTS) as load:
        await asyncio.sleep(WARMUP)
        start = time.monotonic()
        await r.fault("slow", [b])
        await asyncio.sleep(0.3)
        c.kill()
        panicked = await until(lambda: r.status.first(start, lambda e: e.panic) is not None, 2.0)
        assert panicked, "the set-up did not reach panic mode"
        await r.fault("ok", [b])
        # b's ejection ends at the latest base_ejection_time after it began (its first ejection).
        await asyncio.sleep(max(0.0, start + LONG_EJECTION.base_ejection_time + SLACK - time.monotonic()))
        before = await r.scrape()
        await asyncio.sleep(1.5)
        after = await r.scrape()
    last = await r.status.read()
    assert last.panic is False, last
    assert not last.endpoints[b.address].down, last
    assert not last.endpoints[c.address].healthy, last
    dead_attempts = sum(
        delta(before, after, "http_client_request_duration_seconds_count", upstream=APP, error_type=kind)
        for kind in ("refused", "connect-failure", "reset")
    )
    assert dead_attempts == 0  # an unhealthy endpoint outside panic mode gets nothing, breaker probes included
    assert all(s.status == 200 for s in load.samples), [s for s in load.samples if s.status != 200][:5]


async def test_client_gone_during_retry_backoff_releases_the_endpoint(tmp_path: Path) -> None:
    """Clients that give up while the gateway waits out a retry backoff (after a 503) leave nothing behind: the
    endpoint's in_flight returns to 0. (It used to stay +1 per such request for good.)"""
    upstream = Upstream("a")
    upstream.start()
    try:
        upstream.wait_ready()
        retry = {"attempts": 3, "on": ["503"], "backoff": {"base": "1s", "max": "1s"}}  # long backoffs
        config = {
            "service": "faults",
            "routes": [{"name": "r", "cluster": "c", "retry": retry}],
            "clusters": [
                {"name": "c", "endpoints": [upstream.address], "circuit_breaker": {"consecutive_failures": 0}}
            ],
            "limits": {"drain_timeout": "1s"},
        }
        with gateway(tmp_path, config) as gw:
            impatient = aiohttp.ClientTimeout(total=0.1)
            async with aiohttp.ClientSession(timeout=impatient) as session:

                async def give_up() -> None:
                    for _ in range(5):
                        try:
                            async with session.get(f"{gw.url}/status/503") as response:
                                await response.read()
                        except TimeoutError:
                            pass  # gone during the backoff

                await asyncio.gather(*(give_up() for _ in range(4)))
            await asyncio.sleep(2.5)  # past every backoff (1 s) of the abandoned requests
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{gw.admin_url}/status/upstreams") as response:
                    cluster = (await response.json())["c"]
                async with session.get(f"{gw.admin_url}/metrics") as response:
                    metrics = parse_metrics(await response.text())
            assert total(metrics, "meshgate_upstream_retries_total", upstream="c") > 0  # backoffs did happen
            assert cluster["active_requests"] == 0, cluster
            assert cluster["endpoints"][0]["in_flight"] == 0, cluster
    finally:
        upstream.stop()
