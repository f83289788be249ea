"""Endpoint runtime state: in-flight accounting, the peak-EWMA cost, usability and panic mode; injected clock."""

from __future__ import annotations

import math
import random

import pytest

from gateway.config.snapshot import Address, CircuitBreaker
from gateway.upstream.state import DEFAULT_DECAY, DEFAULT_RTT, PENALTY, Endpoint, panic_mode

ADDR = Address("10.0.0.1", 8080)


def make(*, default_rtt: float = DEFAULT_RTT, decay: float = DEFAULT_DECAY) -> Endpoint:
    return Endpoint("orders", ADDR, default_rtt=default_rtt, decay=decay)


def test_identity_fields() -> None:
    endpoint = Endpoint("orders", ADDR, 3)
    assert (endpoint.cluster, endpoint.address, endpoint.weight, endpoint.key) == ("orders", ADDR, 3, "10.0.0.1:8080")
    assert endpoint.in_flight == 0
    assert endpoint.healthy is True
    assert (endpoint.ejected_until, endpoint.times_ejected, endpoint.consecutive_failures_5xx) == (0.0, 0, 0)
    assert endpoint.breaker.state_at(0.0) == "closed"
    assert endpoint.breaker.settings == CircuitBreaker()
    assert endpoint.usable(0.0)
    assert not endpoint.has_rtt


def test_ipv6_key_is_bracketed() -> None:
    assert Endpoint("c", Address("::1", 80)).key == "[::1]:80"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": 0}, "weight must be >= 1"),
        ({"weight": -1}, "weight must be >= 1"),
        ({"default_rtt": 0.0}, "must be positive"),
        ({"decay": -1.0}, "must be positive"),
    ],
)
def test_rejects_bad_parameters(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Endpoint("c", ADDR, **kwargs)  # type: ignore[arg-type]  # the table mixes int and float


def test_slots_reject_unknown_attributes() -> None:
    with pytest.raises(AttributeError):
        make().available = False  # type: ignore[attr-defined]  # replaced by usable(now, panic)


def test_start_finish_abandon_count_in_flight() -> None:
    endpoint = make()
    endpoint.start()
    endpoint.start()
    endpoint.start()
    assert endpoint.in_flight == 3
    endpoint.finish(0.01, now=1.0)
    endpoint.abandon()
    assert endpoint.in_flight == 1


def test_cost_before_any_sample_is_default_rtt_when_idle() -> None:
    assert make().cost(now=123.0) == DEFAULT_RTT
    assert make(default_rtt=0.5).cost(now=0.0) == 0.5


def test_cost_before_any_sample_is_penalised_while_requests_are_outstanding() -> None:
    endpoint = make()
    endpoint.start()
    assert endpoint.cost(0.0) == PENALTY + 1
    endpoint.start()
    assert endpoint.cost(0.0) == PENALTY + 2  # still ordered by load among penalised endpoints


def test_abandon_records_no_sample() -> None:
    endpoint = make()
    endpoint.start()
    endpoint.abandon()
    assert not endpoint.has_rtt
    assert endpoint.cost(5.0) == DEFAULT_RTT


def test_first_sample_replaces_the_default_even_when_lower() -> None:
    endpoint = make()
    endpoint.start()
    endpoint.finish(0.002, now=10.0)
    assert endpoint.has_rtt
    assert endpoint.rtt_estimate(10.0) == pytest.approx(0.002)


def test_peak_replaces_the_estimate_at_once() -> None:
    endpoint = make()
    endpoint.start()
    endpoint.finish(0.010, now=0.0)
    endpoint.start()
    endpoint.finish(0.200, now=0.001)
    assert endpoint.rtt_estimate(0.001) == pytest.approx(0.200)


@pytest.mark.parametrize("elapsed", [0.0, 1.0, 10.0, 30.0])
def test_lower_sample_decays_the_estimate_by_elapsed_time(elapsed: float) -> None:
    endpoint = make()
    endpoint.start()
    endpoint.finish(0.100, now=0.0)
    endpoint.start()
    endpoint.finish(0.010, now=elapsed)
    keep = math.exp(-elapsed / DEFAULT_DECAY)
    assert endpoint.rtt_estimate(elapsed) == pytest.approx(0.100 * keep + 0.010 * (1 - keep))


def test_cost_is_estimate_times_queued_work() -> None:
    endpoint = make()
    endpoint.start()
    endpoint.finish(0.020, now=0.0)
    assert endpoint.cost(0.0) == pytest.approx(0.020)
    for _ in range(4):
        endpoint.start()
    assert endpoint.cost(0.0) == pytest.approx(0.020 * 5)


def test_cost_decays_toward_zero_while_idle_so_a_slow_endpoint_is_retried() -> None:
    endpoint = make(decay=10.0)
    endpoint.start()
    endpoint.finish(0.500, now=100.0)
    assert endpoint.cost(110.0) == pytest.approx(0.500 * math.exp(-1))
    assert endpoint.cost(100.0 + 10.0 * math.log(500)) == pytest.approx(0.001)


def test_cost_only_reads() -> None:
    endpoint = make()
    endpoint.start()
    endpoint.finish(0.050, now=0.0)
    first = [endpoint.cost(5.0) for _ in range(3)]
    assert first == [first[0]] * 3
    assert endpoint.rtt_estimate(0.0) == pytest.approx(0.050)  # reading at 5.0 did not move the stored estimate


def test_clock_going_backwards_does_not_inflate_the_estimate() -> None:
    endpoint = make()
    endpoint.start()
    endpoint.finish(0.050, now=10.0)
    assert endpoint.cost(9.0) == pytest.approx(0.050)
    endpoint.start()
    endpoint.finish(0.010, now=9.0)  # negative elapsed counts as zero: the estimate keeps its value
    assert endpoint.rtt_estimate(9.0) == pytest.approx(0.050)


def test_negative_rtt_counts_as_zero() -> None:
    endpoint = make()
    endpoint.start()
    endpoint.finish(-1.0, now=0.0)
    assert endpoint.rtt_estimate(0.0) == 0.0


# ---- usable: health, ejection and breaker ---------------------------------------------------------------------


def test_breaker_is_built_from_the_given_settings() -> None:
    settings = CircuitBreaker(consecutive_failures=2, open_for=1.0)
    endpoint = Endpoint("c", ADDR, circuit_breaker=settings)
    assert endpoint.breaker.settings is settings
    assert Endpoint("c", ADDR).breaker is not endpoint.breaker  # one breaker per endpoint, never shared


def tripped(endpoint: Endpoint, now: float) -> Endpoint:
    """Trip ``endpoint``'s breaker at ``now`` (default settings: 5 failures, 10 s +-10%)."""
    for _ in range(endpoint.breaker.settings.consecutive_failures):
        endpoint.breaker.record_failure(now, random.Random(0))
    return endpoint


@pytest.mark.parametrize(
    ("healthy", "ejected_until", "breaker_tripped", "panic", "usable"),
    [
        (True, 0.0, False, False, True),
        (False, 0.0, False, False, False),  # failed its health checks
        (True, 150.0, False, False, False),  # ejected until 150, now is 100
        (True, 100.0, False, False, True),  # ejection ends exactly now: back in rotation
        (True, 0.0, True, False, False),  # breaker tripped
        (False, 150.0, False, True, True),  # panic ignores health and ejection ...
        (True, 0.0, True, True, False),  # ... but never the breaker
        (False, 150.0, True, True, False),
    ],
)
def test_usable_table(healthy: bool, ejected_until: float, breaker_tripped: bool, panic: bool, usable: bool) -> None:
    endpoint = make()
    endpoint.healthy = healthy
    endpoint.ejected_until = ejected_until
    if breaker_tripped:
        tripped(endpoint, now=99.0)
    assert endpoint.usable(100.0, panic) is usable
    assert endpoint.usable(100.0, panic=panic) is usable


def test_ejected_at_is_computed_from_now() -> None:
    endpoint = make()
    endpoint.ejected_until = 30.0
    assert [endpoint.ejected_at(t) for t in (0.0, 29.999, 30.0, 31.0)] == [True, True, False, False]


def test_usable_follows_the_breaker_into_probing() -> None:
    endpoint = tripped(make(), now=0.0)
    until = endpoint.breaker.tripped_until
    assert not endpoint.usable(until - 0.001)
    assert endpoint.usable(until)  # probing: one probe may go
    endpoint.breaker.on_attempt(until)
    assert not endpoint.usable(until)  # the probe is out


# ---- panic mode -----------------------------------------------------------------------------------------------


def cluster_of(count: int, *, unhealthy: int = 0, ejected: int = 0, tripped_breakers: int = 0) -> list[Endpoint]:
    eps = [Endpoint("c", Address(f"10.0.1.{i}", 80)) for i in range(count)]
    for endpoint in eps[:unhealthy]:
        endpoint.healthy = False
    for endpoint in eps[unhealthy : unhealthy + ejected]:
        endpoint.ejected_until = 1000.0
    for endpoint in eps[unhealthy + ejected : unhealthy + ejected + tripped_breakers]:
        tripped(endpoint, now=0.0)
    return eps


@pytest.mark.parametrize(
    ("count", "unhealthy", "ejected", "tripped_breakers", "threshold", "panic"),
    [
        (10, 0, 0, 0, 50, False),
        (10, 5, 0, 0, 50, False),  # exactly 50% left: at the threshold, not below it
        (10, 6, 0, 0, 50, True),
        (10, 3, 3, 0, 50, True),  # unhealthy and ejected both count as gone
        (10, 0, 0, 9, 50, False),  # breakers do not count: they apply in panic mode too
        (4, 1, 0, 0, 80, True),  # 75% < 80%
        (3, 2, 0, 0, 34, True),  # 33.3% < 34% (integer arithmetic, no rounding)
        (3, 2, 0, 0, 33, False),  # 33.3% >= 33%
        (10, 10, 0, 0, 0, False),  # threshold 0 disables panic mode
        (10, 0, 0, 0, 100, False),
        (10, 1, 0, 0, 100, True),
        (0, 0, 0, 0, 50, False),  # nothing to spread over
    ],
)
def test_panic_mode_table(
    count: int, unhealthy: int, ejected: int, tripped_breakers: int, threshold: int, panic: bool
) -> None:
    eps = cluster_of(count, unhealthy=unhealthy, ejected=ejected, tripped_breakers=tripped_breakers)
    assert panic_mode(eps, threshold, now=10.0) is panic


def test_panic_mode_ends_when_ejections_expire() -> None:
    eps = cluster_of(4, ejected=3)
    assert panic_mode(eps, 50, now=999.0)
    assert not panic_mode(eps, 50, now=1000.0)
