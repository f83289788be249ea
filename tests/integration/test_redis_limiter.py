"""RedisLimiter against a real redis-server on loopback; RedisCircuit table-driven with a fake clock.

Tests that stop or pause Redis get a server of their own; the others share one per module and use distinct keys.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from gateway.config.snapshot import Address
from gateway.resilience.redis_limiter import RedisCircuit, RedisLimiter, bucket_key
from tests.procs import free_port
from tests.redis_proc import RedisServer, redis_server

TIMEOUT = 0.1  # seconds; the production default is 25 ms, a little more keeps a loaded CI machine honest
SLACK = 0.05  # how much later than TIMEOUT a failing take() may return

_keys = itertools.count()


def fresh_key() -> str:
    return f"route-{next(_keys)}:client"


# -- RedisCircuit (pure) ---------------------------------------------------------------------------------------------

# Each step: (action, now, expected result, state after). Actions: admit / ok / fail / abandon.
CIRCUIT_CASES = [
    pytest.param([("admit", 0.0, True, "closed"), ("ok", 0.0, False, "closed")], id="closed-passes-calls"),
    pytest.param(
        [
            ("fail", 0.0, True, "tripped"),
            ("admit", 0.5, False, "tripped"),
            ("admit", 0.99, False, "tripped"),
            ("admit", 1.0, True, "probing"),
            ("admit", 1.0, False, "probing"),  # one probe at a time
            ("ok", 1.01, True, "closed"),
            ("admit", 1.02, True, "closed"),
        ],
        id="trip-cooldown-probe-recover",
    ),
    pytest.param(
        [
            ("fail", 0.0, True, "tripped"),
            ("admit", 1.0, True, "probing"),
            ("fail", 1.1, False, "tripped"),  # a failed probe re-trips without counting a new trip
            ("admit", 2.0, False, "tripped"),
            ("admit", 2.1, True, "probing"),
        ],
        id="failed-probe-waits-another-cooldown",
    ),
    pytest.param(
        [
            ("fail", 0.0, True, "tripped"),
            ("admit", 1.0, True, "probing"),
            ("abandon", 1.0, None, "tripped"),  # a cancelled probe frees the slot for the next caller
            ("admit", 1.0, True, "probing"),
        ],
        id="abandoned-probe-frees-the-slot",
    ),
    pytest.param(
        [("fail", 0.0, True, "tripped"), ("fail", 0.5, False, "tripped"), ("admit", 1.2, False, "tripped")],
        id="concurrent-failures-extend-the-cooldown",
    ),
]


@pytest.mark.parametrize("steps", CIRCUIT_CASES)
def test_circuit(steps: list[tuple[str, float, bool | None, str]]) -> None:
    circuit = RedisCircuit(cooldown=1.0)
    for action, now, expected, state in steps:
        if action == "admit":
            result: bool | None = circuit.admit(now)
        elif action == "ok":
            result = circuit.succeeded()
        elif action == "fail":
            result = circuit.failed(now)
        else:
            circuit.abandoned()
            result = None
        assert (action, now, result, circuit.state) == (action, now, expected, state)
    assert circuit.trips == sum(1 for a, _, r, _ in steps if a == "fail" and r)


def test_bucket_key() -> None:
    assert bucket_key("meshgate", "orders:10.0.0.1") == "meshgate:rl:orders:10.0.0.1"


# -- against a shared redis-server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
async def limiter(shared_redis: RedisServer) -> AsyncIterator[RedisLimiter]:
    lim = RedisLimiter(shared_redis.address, TIMEOUT, "t")
    yield lim
    await lim.close()


@pytest.fixture
async def raw(shared_redis: RedisServer) -> AsyncIterator[Redis]:
    client: Redis = Redis(host="127.0.0.1", port=shared_redis.port, decode_responses=True)
    yield client
    await client.aclose()


async def test_burst_is_admitted_then_denied_with_a_sensible_retry_after(limiter: RedisLimiter) -> None:
    key = fresh_key()
    results = [await limiter.take(key, rate=10.0, burst=5) for _ in range(6)]
    assert results[:5] == [0.0] * 5
    retry = results[5]
    assert retry is not None
    assert 0.0 < retry <= 0.1  # one token at 10/s: at most 100 ms away, less the time the five takes took
    await asyncio.sleep(retry + 0.01)
    assert await limiter.take(key, rate=10.0, burst=5) == 0.0
    denied = await limiter.take(key, rate=10.0, burst=5)
    assert denied is not None
    assert denied > 0.0


async def test_retry_after_grows_with_the_request_size(limiter: RedisLimiter) -> None:
    key = fresh_key()
    assert await limiter.take(key, rate=2.0, burst=4, requested=4) == 0.0
    retry = await limiter.take(key, rate=2.0, burst=4, requested=3)
    assert retry is not None
    assert 1.4 < retry <= 1.5  # three tokens at 2/s


async def test_keys_have_separate_buckets(limiter: RedisLimiter) -> None:
    a, b = fresh_key(), fresh_key()
    assert await limiter.take(a, rate=1.0, burst=1) == 0.0
    assert await limiter.take(b, rate=1.0, burst=1) == 0.0
    assert (await limiter.take(a, rate=1.0, burst=1) or 0.0) > 0.0


async def test_bucket_layout_and_expiry(limiter: RedisLimiter, raw: Redis) -> None:
    key = fresh_key()
    assert await limiter.take(key, rate=10.0, burst=5) == 0.0
    stored = await raw.hgetall(f"t:rl:{key}")
    assert set(stored) == {"tokens", "ts"}
    assert 3.9 < float(stored["tokens"]) <= 4.0
    seconds, micros = await raw.time()
    assert abs(int(stored["ts"]) - (seconds * 1_000_000 + micros)) < 1_000_000  # Redis's clock, in microseconds
    ttl = await raw.pttl(f"t:rl:{key}")
    assert 900 < ttl <= 1000  # 2 x (5 tokens / 10 per second)


async def test_two_replicas_share_one_bucket(shared_redis: RedisServer) -> None:
    rate, burst, window = 20.0, 5, 1.5
    key = fresh_key()
    replicas = [RedisLimiter(shared_redis.address, TIMEOUT, "t") for _ in range(2)]

    async def hammer(lim: RedisLimiter, stop_at: float) -> int:
        admitted = 0
        while time.monotonic() < stop_at:
            result = await lim.take(key, rate, burst)
            assert result is not None
            admitted += result == 0.0
            await asyncio.sleep(0.005)
        return admitted

    try:
        stop_at = time.monotonic() + window
        counts = await asyncio.gather(*(hammer(lim, stop_at) for lim in replicas))
    finally:
        for lim in replicas:
            await lim.close()
    expected = burst + rate * window  # 35; two independent buckets would admit 70
    assert expected * 0.85 <= sum(counts) <= expected * 1.1, counts
    assert all(c > 0 for c in counts), counts


async def test_concurrent_takes_beyond_the_pool_size_all_get_answers(shared_redis: RedisServer) -> None:
    lim = RedisLimiter(shared_redis.address, 1.0, "t", max_connections=2)
    try:
        key = fresh_key()
        results = await asyncio.gather(*(lim.take(key, rate=1.0, burst=50) for _ in range(100)))
    finally:
        await lim.close()
    assert None not in results
    assert results.count(0.0) == 50
    assert lim.state == "closed"


async def test_noscript_after_script_flush_recovers(limiter: RedisLimiter, raw: Redis) -> None:
    key = fresh_key()
    assert await limiter.take(key, rate=1.0, burst=2) == 0.0
    await raw.script_flush()
    assert await raw.script_exists("0" * 40) == [False]
    assert await limiter.take(key, rate=1.0, burst=2) == 0.0  # NOSCRIPT -> EVAL, state kept
    assert (await limiter.take(key, rate=1.0, burst=2) or 0.0) > 0.0  # the same bucket: now empty
    assert limiter.state == "closed"


@pytest.mark.parametrize(
    ("rate", "burst", "requested"), [(0.0, 1, 1), (-1.0, 1, 1), (1.0, 0, 1), (1.0, 2, 3), (1.0, 2, 0)]
)
async def test_rejects_bad_arguments(limiter: RedisLimiter, rate: float, burst: int, requested: int) -> None:
    with pytest.raises(ValueError, match="need rate > 0"):
        await limiter.take("k", rate, burst, requested=requested)


# -- Redis down or hung: a server per test ---------------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def timed(lim: RedisLimiter, key: str) -> tuple[float | None, float]:
    start = time.monotonic()
    result = await lim.take(key, rate=10.0, burst=5)
    return result, time.monotonic() - start


async def test_stopped_redis_gives_none_quickly_and_recovers(own_redis: RedisServer) -> None:
    clock = FakeClock()
    lim = RedisLimiter(own_redis.address, TIMEOUT, "t", cooldown=1.0, clock=clock)
    try:
        assert await lim.take("k", rate=10.0, burst=5) == 0.0
        own_redis.stop()

        result, took = await timed(lim, "k")
        assert result is None
        assert took < TIMEOUT + SLACK
        assert (lim.state, lim.circuit.trips) == ("tripped", 1)

        result, took = await timed(lim, "k")  # inside the cooldown: not even tried
        assert result is None
        assert took < 0.01

        own_redis.start()  # a new, empty Redis: no script cached, no bucket
        clock.now += 0.5
        assert await lim.take("k", rate=10.0, burst=5) is None  # still cooling down
        clock.now += 0.5
        assert await lim.take("k", rate=10.0, burst=5) == 0.0  # the probe: NOSCRIPT -> EVAL, full bucket
        assert (lim.state, lim.circuit.trips) == ("closed", 1)
    finally:
        await lim.close()


async def test_hung_redis_gives_none_within_the_timeout(own_redis: RedisServer) -> None:
    clock = FakeClock()
    lim = RedisLimiter(own_redis.address, TIMEOUT, "t", cooldown=1.0, clock=clock)
    try:
        assert await lim.take("k", rate=10.0, burst=5) == 0.0
        own_redis.pause()
        try:
            result, took = await timed(lim, "k")
            assert result is None
            assert TIMEOUT - 0.01 <= took < TIMEOUT + SLACK

            result, took = await timed(lim, "k")  # the circuit spares callers a second wait
            assert result is None
            assert took < 0.01

            clock.now += 1.0
            result, took = await timed(lim, "k")  # the probe waits once more, and fails
            assert result is None
            assert took >= TIMEOUT - 0.01
            assert (lim.state, lim.circuit.trips) == ("tripped", 1)
        finally:
            own_redis.resume()
        clock.now += 1.0
        assert await lim.take("k", rate=10.0, burst=5) == 0.0
        assert lim.state == "closed"
    finally:
        await lim.close()


async def test_only_one_probe_goes_to_redis_after_the_cooldown(own_redis: RedisServer) -> None:
    clock = FakeClock()
    lim = RedisLimiter(own_redis.address, TIMEOUT, "t", cooldown=1.0, clock=clock)
    try:
        own_redis.pause()
        try:
            assert await lim.take("k", rate=10.0, burst=5) is None
            clock.now += 1.0
            start = time.monotonic()
            results = await asyncio.gather(*(lim.take("k", rate=10.0, burst=5) for _ in range(20)))
            assert results == [None] * 20
            assert time.monotonic() - start < TIMEOUT + SLACK  # one probe waited; the other 19 answered at once
        finally:
            own_redis.resume()
    finally:
        await lim.close()


async def test_nothing_listening_gives_none_at_once() -> None:
    lim = RedisLimiter(Address("127.0.0.1", free_port()), TIMEOUT, "t")
    try:
        result, took = await timed(lim, "k")
        assert result is None
        assert took < TIMEOUT + SLACK
    finally:
        await lim.close()
