"""e2e: rate limits through real gateways: local token buckets per route and key, and a limit shared in Redis.

The local tests share one gateway with a route per key kind; their rates are low enough (one token per 5 s) that
nothing refills while a test runs, so every count is exact. The shared test (the issue's scenario 5) starts two
gateways on one real ``redis-server``, loads both, then stops Redis under them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.procs import Gateway, gateway, metric_sum
from tests.redis_proc import redis_server

pytestmark = pytest.mark.e2e

SLOW_REFILL = {"rps": 0.2, "burst": 2}  # two at once, then one per 5 s: no refill within a test


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, upstream_a: int) -> Iterator[Gateway]:
    limits: dict[str, dict[str, Any]] = {
        "burst": {"rps": 10, "burst": 5, "key": "route"},
        "shape": {"rps": 0.5, "burst": 1, "key": "route"},
        "by-client": {**SLOW_REFILL, "key": "client"},
        "by-tenant": {**SLOW_REFILL, "key": "header:x-tenant"},
        "by-route": {**SLOW_REFILL, "key": "route"},
    }
    config = {
        "service": "ratelimit",
        "routes": [
            {"name": name, "match": {"path_prefix": f"/{name}/"}, "cluster": "a", "rate_limit": limit}
            for name, limit in limits.items()
        ],
        "clusters": [{"name": "a", "endpoints": [f"127.0.0.1:{upstream_a}"]}],
    }
    with gateway(tmp_path_factory.mktemp("ratelimit"), config) as running:
        yield running


# --- helpers -----------------------------------------------------------------------------------------------------


async def metric(gw: Gateway, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{gw.admin_url}/metrics") as response:
        return metric_sum(await response.text(), name, **labels)


async def statuses(
    url: str, count: int, *, client: str = "127.0.0.1", headers: dict[str, str] | None = None
) -> list[int]:
    """``count`` sequential GETs from the source address ``client``; their statuses."""
    connector = aiohttp.TCPConnector(local_addr=(client, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        result = []
        for _ in range(count):
            async with session.get(url, headers=headers) as response:
                await response.read()
                result.append(response.status)
        return result


# --- local buckets -------------------------------------------------------------------------------------------------


async def test_burst_then_the_sustained_rate(gw: Gateway) -> None:
    # rps 10, burst 5: five at once, the sixth refused; then, offered 50 requests/s for 2 s, about 10 a second.
    rejections_before = await metric(gw, "meshgate_ratelimit_rejections_total", http_route="burst")
    url = f"{gw.url}/burst/x"
    async with aiohttp.ClientSession() as session:
        first = time.monotonic()
        sent: list[tuple[float, int]] = []
        for n in range(106):
            if n >= 6:  # the first six back to back, the rest paced at 50/s
                await asyncio.sleep(max(0.0, first + n * 0.02 - time.monotonic()))
            started = time.monotonic()
            async with session.get(url) as response:
                await response.read()
                sent.append((started, response.status))
    span = sent[-1][0] - sent[0][0]
    admitted = sum(1 for _, status in sent if status == 200)
    assert [status for _, status in sent[:6]] == [200] * 5 + [429]
    assert {status for _, status in sent} == {200, 429}
    # A bucket that starts full admits at most burst + rps x elapsed; offered 5x the rate, it admits about that.
    assert 5 + 10 * span * 0.85 <= admitted <= 5 + 10 * span + 1, (admitted, span)
    rejections_after = await metric(gw, "meshgate_ratelimit_rejections_total", http_route="burst")
    assert rejections_after - rejections_before == len(sent) - admitted


async def test_rejection_is_the_contract_local_reply(gw: Gateway) -> None:
    url = f"{gw.url}/shape/x"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert response.status == 200
        request_id = uuid.uuid4().hex
        async with session.get(url, headers={"x-request-id": request_id}) as response:
            body = await response.json()
            assert response.status == 429
            assert response.headers["x-request-id"] == request_id
            assert response.headers["content-type"].startswith("application/json")
            retry_after = response.headers["Retry-After"]
        async with session.get(url) as response:  # without one, the gateway's id is in header and body alike
            generated = await response.json()
            assert generated["request_id"] == response.headers["x-request-id"] != ""
    assert set(body) >= {"error", "message", "request_id", "trace_id"}
    assert (body["error"], body["request_id"]) == ("rate_limited", request_id)
    assert retry_after.isdigit()
    assert 1 <= int(retry_after) <= 2  # rps 0.5: the next token is at most 2 s away


async def test_client_key_gives_each_source_address_its_own_bucket(gw: Gateway) -> None:
    url = f"{gw.url}/by-client/x"
    assert await statuses(url, 3, client="127.0.0.1") == [200, 200, 429]
    assert await statuses(url, 3, client="127.0.0.2") == [200, 200, 429]
    assert await statuses(url, 1, client="127.0.0.1") == [429]  # still empty: a new connection changes nothing
    assert await metric(gw, "meshgate_ratelimit_rejections_total", http_route="by-client") == 3


async def test_header_key_gives_each_value_its_own_bucket(gw: Gateway) -> None:
    url = f"{gw.url}/by-tenant/x"
    assert await statuses(url, 3, headers={"x-tenant": "acme"}) == [200, 200, 429]
    assert await statuses(url, 3, headers={"X-Tenant": "globex"}) == [200, 200, 429]
    # Requests without the header share one bucket, whoever sends them: they do not escape the limit.
    assert await statuses(url, 2, client="127.0.0.1") == [200, 200]
    assert await statuses(url, 1, client="127.0.0.3") == [429]
    assert await metric(gw, "meshgate_ratelimit_rejections_total", http_route="by-tenant") == 3


async def test_route_key_is_one_bucket_for_everyone(gw: Gateway) -> None:
    url = f"{gw.url}/by-route/x"
    assert await statuses(url, 2, client="127.0.0.1") == [200, 200]
    assert await statuses(url, 1, client="127.0.0.2") == [429]
    assert await statuses(url, 1, client="127.0.0.3", headers={"x-tenant": "acme"}) == [429]
    assert await metric(gw, "meshgate_ratelimit_rejections_total", http_route="by-route") == 2


# --- shared in Redis (scenario 5) ----------------------------------------------------------------------------------

SHARED_RPS = 20
SHARED_BURST = 10
OFFERED_PER_GATEWAY = 60  # requests/s offered to each gateway: 3x the shared limit, 6x in total
LOAD_SECONDS = 3.0


async def load(gw: Gateway, seconds: float, per_second: float, workers: int = 4) -> tuple[Counter[int], float]:
    """Offer ``per_second`` GETs a second to ``gw`` for ``seconds`` from ``workers`` paced clients; the statuses
    and the time from the first request sent to the last one sent. Each send is jittered within its slot, so two
    loads on one shared bucket race for its tokens fairly instead of one always arriving first."""
    seen: Counter[int] = Counter()
    sends: list[float] = []
    interval = workers / per_second
    start = time.monotonic()

    async def worker(session: aiohttp.ClientSession, rng: random.Random) -> None:
        n = 0
        while True:
            due = start + (n + rng.random()) * interval
            if due - start >= seconds:
                return
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            sends.append(time.monotonic())
            async with session.get(f"{gw.url}/shared/x") as response:
                await response.read()
                seen[response.status] += 1
            n += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session, random.Random()) for _ in range(workers)))
    return seen, max(sends) - min(sends)


async def test_two_gateways_share_a_redis_limit_and_survive_redis_stopping(
    tmp_path: Path, upstream_a: int, capsys: pytest.CaptureFixture[str]
) -> None:
    with redis_server() as redis, contextlib.ExitStack() as stack:
        config = {
            "service": "shared",
            "routes": [
                {
                    "name": "shared",
                    "match": {"path_prefix": "/shared/"},
                    "cluster": "a",
                    "rate_limit": {"rps": SHARED_RPS, "burst": SHARED_BURST, "key": "route", "shared": True},
                }
            ],
            "clusters": [{"name": "a", "endpoints": [f"127.0.0.1:{upstream_a}"]}],
            "rate_limit_service": {"redis": f"127.0.0.1:{redis.port}", "prefix": f"t{uuid.uuid4().hex[:8]}"},
        }
        gateways = []
        for n in (1, 2):
            directory = tmp_path / f"gw{n}"
            directory.mkdir()
            gateways.append(stack.enter_context(gateway(directory, config)))

        # Phase 1: both gateways loaded at 3x the limit each; together they admit the limit, not twice it.
        results = await asyncio.gather(*(load(g, LOAD_SECONDS, OFFERED_PER_GATEWAY) for g in gateways))
        admitted = [seen[200] for seen, _ in results]
        span = max(elapsed for _, elapsed in results)
        fallbacks_shared = [await metric(g, "meshgate_ratelimit_redis_fallbacks_total") for g in gateways]
        for seen, _ in results:
            assert set(seen) <= {200, 429}, seen
        assert fallbacks_shared == [0, 0]  # every decision came from Redis
        ceiling = SHARED_RPS * span + SHARED_BURST
        assert sum(admitted) <= ceiling + 3, (admitted, span)
        assert sum(admitted) >= 0.8 * SHARED_RPS * span, (admitted, span)  # the limit is reached, not starved
        assert sum(admitted) < 1.5 * SHARED_RPS * span  # clearly below 2N: the replicas did not each admit N
        assert min(admitted) >= 0.2 * sum(admitted), admitted  # both got a fair share of the tokens

        # Phase 2: Redis goes away. Both keep serving from their local buckets: limited, never failing.
        redis.stop()
        after = await asyncio.gather(*(load(g, 2.0, OFFERED_PER_GATEWAY) for g in gateways))
        fallbacks_down = [await metric(g, "meshgate_ratelimit_redis_fallbacks_total") for g in gateways]
        for seen, _ in after:
            assert set(seen) <= {200, 429}, seen  # no 5xx: Redis trouble is never the client's
            assert seen[200] > 0
        assert all(count > 0 for count in fallbacks_down), fallbacks_down
        logged = [json.loads(line) for line in gateways[0].log_path.read_text().splitlines() if line.startswith("{")]
        assert any(line.get("event") == "redis_limiter_unavailable" for line in logged)

    with capsys.disabled():  # the figures for bench/RESULTS.md, visible with -s
        print(
            f"\nscenario 5: limit {SHARED_RPS} rps (burst {SHARED_BURST}) shared by 2 gateways, each offered "
            f"{OFFERED_PER_GATEWAY} rps for {span:.2f} s: admitted {admitted} = {sum(admitted)} "
            f"(ceiling {ceiling:.0f}, 2N would be {2 * SHARED_RPS * span:.0f}); "
            f"Redis stopped: admitted {[seen[200] for seen, _ in after]} in 2 s, "
            f"statuses {[dict(seen) for seen, _ in after]}, redis fallbacks {fallbacks_down}"
        )


async def bursts(gw: Gateway, count: int, size: int, every: float) -> Counter[int]:
    """``count`` bursts of ``size`` concurrent GETs, ``every`` seconds apart; the statuses."""
    seen: Counter[int] = Counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=size)) as session:

        async def one() -> None:
            async with session.get(f"{gw.url}/shared/x") as response:
                await response.read()
                seen[response.status] += 1

        for _ in range(count):
            started = time.monotonic()
            await asyncio.gather(*(one() for _ in range(size)))
            await asyncio.sleep(max(0.0, started + every - time.monotonic()))
    return seen


async def test_shared_limit_resumes_after_redis_restarts(tmp_path: Path, upstream_a: int) -> None:
    with redis_server() as redis:
        config = {
            "service": "shared",
            "routes": [
                {
                    "name": "shared",
                    "match": {"path_prefix": "/shared/"},
                    "cluster": "a",
                    "rate_limit": {"rps": 1000, "burst": 1000, "key": "route", "shared": True},
                }
            ],
            "clusters": [{"name": "a", "endpoints": [f"127.0.0.1:{upstream_a}"]}],
            "rate_limit_service": {"redis": f"127.0.0.1:{redis.port}"},
        }
        with gateway(tmp_path, config) as gw:
            # Concurrent calls open every connection of the limiter's pool (8). (Not many more: a call that waits
            # for a connection past the 25 ms timeout is cancelled, and its connection closed, not left stale.)
            await bursts(gw, 3, 12, 0.05)
            redis.stop()
            await bursts(gw, 1, 1, 0)
            assert await metric(gw, "meshgate_ratelimit_redis_fallbacks_total") == 1
            redis.start()  # same port, a new process: every pooled connection is to the old one
            await asyncio.sleep(1.2)  # past the 1 s pause after the last failure
            await bursts(gw, 1, 12, 0)  # the first call probes Redis (the others meanwhile fall back) and recovers
            before = await metric(gw, "meshgate_ratelimit_redis_fallbacks_total")
            seen = await bursts(gw, 15, 12, 0.1)
            after = await metric(gw, "meshgate_ratelimit_redis_fallbacks_total")
    assert set(seen) == {200}, seen
    # Redis is up and has answered: no decision may fall back to the local bucket any more.
    assert after - before == 0
