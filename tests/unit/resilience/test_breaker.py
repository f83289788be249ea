"""The per-endpoint breaker's transitions (closed / tripped / probing) and the cluster admission thresholds."""

from __future__ import annotations

import random

import pytest

from gateway.config.snapshot import CircuitBreaker
from gateway.resilience.breaker import BREAKER_STATES, STATE_VALUES, Admission, Breaker


class FixedJitter(random.Random):
    """An rng whose uniform() always returns ``factor`` when asked for the trip jitter (0.9..1.1)."""

    def __init__(self, factor: float = 1.0) -> None:
        super().__init__(0)
        self.factor = factor

    def uniform(self, a: float, b: float) -> float:
        assert (a, b) == (0.9, 1.1)
        return self.factor


SETTINGS = CircuitBreaker(consecutive_failures=3, open_for=10.0, max_open_for=35.0)
RNG = FixedJitter()


def tripped_breaker(now: float = 0.0, settings: CircuitBreaker = SETTINGS) -> Breaker:
    breaker = Breaker(settings)
    for _ in range(settings.consecutive_failures):
        breaker.record_failure(now, RNG)
    return breaker


# ---- scenarios: (time, event) -> state after it ---------------------------------------------------------------

Step = tuple[float, str, str]  # (now, event, expected state_at(now) afterwards)

SCENARIOS: dict[str, list[Step]] = {
    "trips after N consecutive failures": [
        (0.0, "fail", "closed"),
        (1.0, "fail", "closed"),
        (2.0, "fail", "tripped"),  # third in a row: tripped for 10 s
        (11.9, "-", "tripped"),
        (12.0, "-", "probing"),  # computed from the clock, no timer
    ],
    "a success resets the count": [
        (0.0, "fail", "closed"),
        (0.1, "fail", "closed"),
        (0.2, "ok", "closed"),
        (0.3, "fail", "closed"),
        (0.4, "fail", "closed"),
        (0.5, "fail", "tripped"),
    ],
    "probe success closes": [
        (0.0, "trip", "tripped"),
        (10.0, "attempt", "probing"),
        (10.2, "ok", "closed"),
        (10.3, "fail", "closed"),  # the count starts again from zero
    ],
    "probe failure trips again for twice as long, up to the cap": [
        (0.0, "trip", "tripped"),  # 10 s
        (10.0, "attempt", "probing"),
        (10.1, "fail", "tripped"),  # 20 s
        (30.0, "-", "tripped"),
        (30.1, "attempt", "probing"),
        (30.2, "fail", "tripped"),  # 40 s, capped at 35
        (65.1, "-", "tripped"),
        (65.2, "-", "probing"),
        (65.2, "attempt", "probing"),
        (65.3, "fail", "tripped"),  # still 35
        (100.3, "attempt", "probing"),
        (100.4, "ok", "closed"),
    ],
    "outcomes while tripped are ignored": [
        (0.0, "trip", "tripped"),
        (1.0, "ok", "tripped"),  # a request sent before the trip answered: proves nothing new
        (2.0, "fail", "tripped"),  # and does not extend the trip
        (10.0, "-", "probing"),
    ],
}


@pytest.mark.parametrize("steps", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_scenario(steps: list[Step]) -> None:
    breaker = Breaker(SETTINGS)
    for now, event, expected in steps:
        if event == "fail":
            breaker.record_failure(now, RNG)
        elif event == "ok":
            breaker.record_success(now)
        elif event == "attempt":
            breaker.on_attempt(now)
        elif event == "trip":
            for _ in range(SETTINGS.consecutive_failures):
                breaker.record_failure(now, RNG)
        assert breaker.state_at(now) == expected, (now, event)


@pytest.mark.parametrize(
    ("open_for", "max_open_for", "durations"),
    [
        (10.0, 300.0, [10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]),  # the defaults: doubling to the cap
        (10.0, 35.0, [10.0, 20.0, 35.0, 35.0]),
        (5.0, 5.0, [5.0, 5.0, 5.0]),
        (1.0, 1e9, [1.0, 2.0, 4.0, 8.0]),
    ],
)
def test_trip_durations_double_up_to_the_cap(open_for: float, max_open_for: float, durations: list[float]) -> None:
    breaker = tripped_breaker(0.0, CircuitBreaker(consecutive_failures=1, open_for=open_for, max_open_for=max_open_for))
    seen = [breaker.tripped_until]
    for _ in durations[1:]:
        now = breaker.tripped_until
        assert breaker.state_at(now) == "probing"
        breaker.on_attempt(now)
        breaker.record_failure(now, RNG)
        seen.append(breaker.tripped_until - now)
    assert seen == pytest.approx(durations)
    assert breaker.trips == len(durations)


def test_trip_count_survives_a_thousand_trips() -> None:
    breaker = tripped_breaker(0.0, CircuitBreaker(consecutive_failures=1, open_for=1.0, max_open_for=2.0))
    for _ in range(1000):  # 2**999 would overflow a float without the exponent bound
        now = breaker.tripped_until
        breaker.record_failure(now, RNG)
    assert breaker.tripped_until - now == pytest.approx(2.0)


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_jitter_is_applied_after_the_cap(factor: float) -> None:
    breaker = Breaker(CircuitBreaker(consecutive_failures=1, open_for=50.0, max_open_for=30.0))
    breaker.record_failure(100.0, FixedJitter(factor))
    assert breaker.tripped_until == pytest.approx(100.0 + 30.0 * factor)


def test_jitter_spreads_trip_durations_over_plus_minus_ten_percent() -> None:
    durations = []
    for seed in range(500):
        breaker = Breaker(SETTINGS)
        rng = random.Random(seed)
        for _ in range(3):
            breaker.record_failure(0.0, rng)
        durations.append(breaker.tripped_until)
    assert all(9.0 <= d <= 11.0 for d in durations)
    assert min(durations) < 9.1
    assert max(durations) > 10.9


def test_probing_admits_exactly_one_probe() -> None:
    breaker = tripped_breaker()
    assert not breaker.admits(9.99)
    assert [breaker.admits(10.0) for _ in range(3)] == [True] * 3  # admits() only reads: no probe claimed yet
    breaker.on_attempt(10.0)
    assert not breaker.admits(10.0)
    assert not breaker.admits(15.0)
    assert breaker.state_at(15.0) == "probing"
    breaker.record_success(15.0)
    assert breaker.admits(15.0)


def test_on_attempt_outside_probing_claims_nothing() -> None:
    breaker = Breaker(SETTINGS)
    breaker.on_attempt(0.0)
    assert breaker.admits(0.0)
    breaker = tripped_breaker()
    breaker.on_attempt(5.0)  # tripped: not a probe
    assert breaker.admits(10.0)


def test_abandoned_probe_frees_the_slot() -> None:
    breaker = tripped_breaker()
    breaker.on_attempt(10.0)
    assert not breaker.admits(10.5)
    breaker.on_abandon(10.5)
    assert breaker.admits(10.5)
    assert breaker.state_at(10.5) == "probing"


def test_a_lost_probe_stops_blocking_after_open_for() -> None:
    breaker = tripped_breaker()
    breaker.on_attempt(10.0)  # and its outcome is never reported
    assert not breaker.admits(19.99)
    assert breaker.admits(20.0)


def test_probe_success_resets_the_backoff() -> None:
    breaker = tripped_breaker()
    breaker.on_attempt(10.0)
    breaker.record_failure(10.0, RNG)  # second trip: 20 s
    assert breaker.trips == 2
    breaker.on_attempt(30.0)
    breaker.record_success(30.0)
    assert (breaker.state_at(30.0), breaker.trips, breaker.failures) == ("closed", 0, 0)
    for _ in range(3):
        breaker.record_failure(40.0, RNG)
    assert breaker.tripped_until == pytest.approx(50.0)  # back to open_for


def test_zero_threshold_never_trips() -> None:
    breaker = Breaker(CircuitBreaker(consecutive_failures=0))
    for i in range(1000):
        breaker.record_failure(float(i), RNG)
    assert breaker.state_at(1000.0) == "closed"
    assert breaker.admits(1000.0)


def test_reconfigure_keeps_the_state() -> None:
    breaker = Breaker(SETTINGS)
    breaker.record_failure(0.0, RNG)
    breaker.record_failure(0.0, RNG)
    breaker.reconfigure(CircuitBreaker(consecutive_failures=2, open_for=1.0))
    assert breaker.failures == 2
    breaker.record_failure(0.0, RNG)  # 3 >= the new threshold of 2
    assert breaker.tripped_until == pytest.approx(1.0)


def test_state_names_and_metric_values_are_fixed() -> None:
    assert BREAKER_STATES == ("closed", "tripped", "probing")
    assert STATE_VALUES == {"closed": 0, "tripped": 1, "probing": 2}


# ---- Admission ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_requests", "max_pending", "pool_size", "results"),
    [
        (2, 100, 10, [None, None, "max_requests", "max_requests"]),
        (100, 1, 2, [None, None, None, "max_pending"]),  # 2 on the wire, 1 waiting, the 4th would be a 2nd waiter
        (100, 0, 2, [None, None, "max_pending"]),  # no queueing at all
        (3, 0, 2, [None, None, "max_pending", "max_pending"]),  # max_requests is checked first, but not reached
        (2, 0, 1, [None, "max_pending", "max_pending"]),
        (0, 100, 10, ["max_requests"]),
    ],
)
def test_admission_table(max_requests: int, max_pending: int, pool_size: int, results: list[str | None]) -> None:
    admission = Admission(CircuitBreaker(max_requests=max_requests, max_pending=max_pending))
    assert [admission.try_enter(pool_size) for _ in results] == results
    assert admission.active == results.count(None)  # refusals are not counted


def test_admission_leave_makes_room() -> None:
    admission = Admission(CircuitBreaker(max_requests=1))
    assert admission.try_enter(10) is None
    assert admission.try_enter(10) == "max_requests"
    admission.leave()
    assert admission.active == 0
    assert admission.try_enter(10) is None


def test_admission_pending_counts_requests_beyond_the_pool() -> None:
    admission = Admission(CircuitBreaker())
    for _ in range(5):
        admission.try_enter(3)
    assert admission.pending(3) == 2
    assert admission.pending(10) == 0


def test_admission_leave_never_goes_negative() -> None:
    admission = Admission(CircuitBreaker())
    admission.leave()
    assert admission.active == 0


def test_admission_reconfigure_keeps_the_count() -> None:
    admission = Admission(CircuitBreaker(max_requests=10))
    for _ in range(3):
        admission.try_enter(100)
    admission.reconfigure(CircuitBreaker(max_requests=2))
    assert admission.active == 3
    assert admission.try_enter(100) == "max_requests"
