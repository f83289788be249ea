"""Consecutive-5xx outlier ejection: threshold, growing ejection time, the max-percent cap and return after time."""

from __future__ import annotations

import pytest

from gateway.config.snapshot import Address, OutlierDetection
from gateway.upstream.outlier import OutlierDetector
from gateway.upstream.state import Endpoint

SETTINGS = OutlierDetection(consecutive_5xx=3, base_ejection_time=30.0, max_ejection_time=300.0)


def cluster(count: int) -> list[Endpoint]:
    return [Endpoint("c", Address(f"10.0.2.{i}", 80)) for i in range(count)]


def fail_until_ejected(detector: OutlierDetector, endpoint: Endpoint, now: float, eps: list[Endpoint]) -> bool:
    """Report ``consecutive_5xx`` failures at ``now``; True if the last one ejected the endpoint."""
    results = [detector.record(endpoint, True, now, eps) for _ in range(detector.settings.consecutive_5xx)]
    assert not any(results[:-1])  # only the call that crosses the threshold ejects
    return results[-1]


def test_ejects_on_the_nth_consecutive_failure() -> None:
    eps = cluster(2)
    detector = OutlierDetector(SETTINGS)
    assert [detector.record(eps[0], True, 1.0, eps) for _ in range(3)] == [False, False, True]
    assert (eps[0].times_ejected, eps[0].ejected_until, eps[0].consecutive_failures_5xx) == (1, 31.0, 0)
    assert not eps[0].usable(30.9)
    assert eps[0].usable(31.0)  # back after its time, no timer involved


def test_a_success_resets_the_count() -> None:
    eps = cluster(2)
    detector = OutlierDetector(SETTINGS)
    outcomes = [True, True, False, True, True]
    assert not any(detector.record(eps[0], failed, 0.0, eps) for failed in outcomes)
    assert eps[0].consecutive_failures_5xx == 2
    assert detector.record(eps[0], True, 0.0, eps)


def test_outcomes_while_ejected_are_ignored() -> None:
    eps = cluster(2)
    detector = OutlierDetector(SETTINGS)
    assert fail_until_ejected(detector, eps[0], 0.0, eps)
    for _ in range(10):
        assert not detector.record(eps[0], True, 10.0, eps)  # late answers to requests sent before
    assert (eps[0].times_ejected, eps[0].ejected_until, eps[0].consecutive_failures_5xx) == (1, 30.0, 0)


@pytest.mark.parametrize(
    ("base", "maximum", "durations"),
    [
        (30.0, 300.0, [30.0, 60.0, 90.0, 120.0, 150.0, 180.0, 210.0, 240.0, 270.0, 300.0, 300.0]),  # the defaults
        (10.0, 25.0, [10.0, 20.0, 25.0, 25.0]),
        (5.0, 5.0, [5.0, 5.0]),
    ],
)
def test_ejection_time_grows_with_times_ejected(base: float, maximum: float, durations: list[float]) -> None:
    eps = cluster(2)
    detector = OutlierDetector(OutlierDetection(consecutive_5xx=1, base_ejection_time=base, max_ejection_time=maximum))
    now = 0.0
    seen = []
    for _ in durations:
        assert detector.record(eps[0], True, now, eps)  # fails again the moment it returns: no decay
        seen.append(eps[0].ejected_until - now)
        now = eps[0].ejected_until
    assert seen == pytest.approx(durations)
    assert eps[0].times_ejected == len(durations)
    assert [detector.ejection_time(n) for n in range(1, len(durations) + 1)] == pytest.approx(durations)


@pytest.mark.parametrize(
    ("good_for", "times_before", "times_after"),
    [
        (0.0, 3, 4),  # no time in rotation: no decay
        (29.9, 3, 4),
        (30.0, 3, 3),  # one base time in rotation: one step down, then +1 for this ejection
        (65.0, 3, 2),
        (1000.0, 3, 1),  # fully decayed: treated like a first offender
    ],
)
def test_times_ejected_decays_while_the_endpoint_behaves(good_for: float, times_before: int, times_after: int) -> None:
    eps = cluster(2)
    detector = OutlierDetector(OutlierDetection(consecutive_5xx=1, base_ejection_time=30.0))
    endpoint = eps[0]
    endpoint.times_ejected = times_before
    endpoint.ejected_until = 100.0
    assert detector.record(endpoint, True, 100.0 + good_for, eps)
    assert endpoint.times_ejected == times_after
    assert endpoint.ejected_until == pytest.approx(100.0 + good_for + 30.0 * times_after)


@pytest.mark.parametrize(
    ("size", "percent", "ejectable"),
    [
        (10, 10, 1),  # Envoy's default: 10% of 10
        (20, 10, 2),
        (25, 10, 2),  # 2.5 rounds down
        (3, 10, 1),  # 10% of 3 is 0.3 endpoints, but one ejection is always allowed
        (1, 10, 1),  # even the only endpoint (panic mode or a 503 then decides)
        (5, 0, 1),  # at least one, whatever the percent
        (4, 50, 2),
        (4, 100, 4),
    ],
)
def test_max_ejection_percent_with_at_least_one(size: int, percent: int, ejectable: int) -> None:
    eps = cluster(size)
    detector = OutlierDetector(OutlierDetection(consecutive_5xx=1, max_ejection_percent=percent))
    ejected = [detector.record(endpoint, True, 0.0, eps) for endpoint in eps]
    assert ejected == [True] * ejectable + [False] * (size - ejectable)
    assert sum(e.ejected_at(0.0) for e in eps) == ejectable


def test_refused_outlier_is_ejected_once_there_is_room() -> None:
    eps = cluster(10)
    detector = OutlierDetector(SETTINGS)  # 10%: one of ten
    assert fail_until_ejected(detector, eps[0], 0.0, eps)
    assert not fail_until_ejected(detector, eps[1], 1.0, eps)  # the cap holds
    assert eps[1].consecutive_failures_5xx == 3  # it keeps its count
    assert not detector.record(eps[1], True, 29.0, eps)
    assert detector.record(eps[1], True, 30.0, eps)  # eps[0] is back: room for one again
    assert eps[1].ejected_until == 60.0


def test_zero_threshold_never_ejects() -> None:
    eps = cluster(2)
    detector = OutlierDetector(OutlierDetection(consecutive_5xx=0))
    assert not any(detector.record(eps[0], True, 0.0, eps) for _ in range(100))
    assert eps[0].usable(0.0)


def test_state_lives_on_the_endpoint_not_the_detector() -> None:
    eps = cluster(2)
    assert fail_until_ejected(OutlierDetector(SETTINGS), eps[0], 0.0, eps)
    fresh = OutlierDetector(SETTINGS)  # e.g. rebuilt by a reload: the ejection stands
    assert not fresh.record(eps[0], True, 10.0, eps)
    assert eps[0].ejected_at(10.0)


def test_reconfigure_applies_to_the_next_ejection() -> None:
    eps = cluster(2)
    detector = OutlierDetector(SETTINGS)
    assert fail_until_ejected(detector, eps[0], 0.0, eps)
    detector.reconfigure(OutlierDetection(consecutive_5xx=1, base_ejection_time=5.0))
    assert eps[0].ejected_until == 30.0
    assert detector.record(eps[0], True, 30.0, eps)
    assert eps[0].ejected_until == 40.0  # 5 s x second ejection
