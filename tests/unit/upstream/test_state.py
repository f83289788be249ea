"""Endpoint runtime state: in-flight accounting and the peak-EWMA cost, with an injected clock."""

from __future__ import annotations

import math

import pytest

from gateway.config.snapshot import Address
from gateway.upstream.state import DEFAULT_DECAY, DEFAULT_RTT, PENALTY, Endpoint

ADDR = Address("10.0.0.1", 8080)


def make(*, default_rtt: float = DEFAULT_RTT, decay: float = DEFAULT_DECAY) -> Endpoint:
    return Endpoint("orders", ADDR, default_rtt=default_rtt, decay=decay)


def test_identity_fields() -> None:
    endpoint = Endpoint("orders", ADDR, 3)
    assert (endpoint.cluster, endpoint.address, endpoint.weight, endpoint.key) == ("orders", ADDR, 3, "10.0.0.1:8080")
    assert endpoint.in_flight == 0
    assert endpoint.available is True
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
        make().healthy = False  # type: ignore[attr-defined]


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
