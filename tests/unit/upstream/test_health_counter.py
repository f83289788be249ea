"""HealthCounter: consecutive-result thresholds decide health transitions (pure, table-driven)."""

from __future__ import annotations

import random

import pytest

from gateway.upstream.health import JITTER, HealthCounter, jittered

# (unhealthy_threshold, healthy_threshold, start healthy, results, expected observe() return per result)
CASES = [
    pytest.param(3, 2, True, "+++", [None, None, None], id="healthy-stays-healthy"),
    pytest.param(3, 2, True, "---", [None, None, False], id="three-failures-mark-unhealthy"),
    pytest.param(3, 2, True, "--+--", [None, None, None, None, None], id="a-success-resets-the-failure-streak"),
    pytest.param(3, 2, True, "--+---", [None, None, None, None, None, False], id="full-streak-after-reset"),
    pytest.param(3, 2, True, "----", [None, None, False, None], id="no-repeat-transition-while-unhealthy"),
    pytest.param(3, 2, False, "++", [None, True], id="two-successes-mark-healthy"),
    pytest.param(3, 2, False, "+-+", [None, None, None], id="a-failure-resets-the-success-streak"),
    pytest.param(3, 2, True, "---++", [None, None, False, None, True], id="down-then-up"),
    pytest.param(3, 2, True, "---+-++", [None, None, False, None, None, None, True], id="flapping-recovery"),
    pytest.param(1, 1, True, "-+-+", [False, True, False, True], id="thresholds-of-one-follow-every-result"),
    pytest.param(2, 3, True, "--+++", [None, False, None, None, True], id="asymmetric-thresholds"),
    pytest.param(2, 3, True, "--++-+++", [None, False, None, None, None, None, None, True], id="asymmetric-reset"),
    pytest.param(1, 5, False, "-", [None], id="failure-while-unhealthy-is-no-transition"),
]


@pytest.mark.parametrize(("unhealthy", "healthy", "start", "results", "expected"), CASES)
def test_transitions(unhealthy: int, healthy: int, start: bool, results: str, expected: list[bool | None]) -> None:
    counter = HealthCounter(unhealthy, healthy, healthy=start)
    got = [counter.observe(r == "+") for r in results]
    assert got == expected
    # The state is the last transition's value (or the start when nothing changed).
    transitions = [g for g in got if g is not None]
    assert counter.healthy is (transitions[-1] if transitions else start)


def test_starts_healthy_by_default() -> None:
    assert HealthCounter(3, 2).healthy is True


@pytest.mark.parametrize(("unhealthy", "healthy"), [(0, 2), (3, 0), (-1, 1)])
def test_rejects_thresholds_below_one(unhealthy: int, healthy: int) -> None:
    with pytest.raises(ValueError, match="thresholds must be >= 1"):
        HealthCounter(unhealthy, healthy)


def test_jitter_stays_within_bounds_and_varies() -> None:
    rng = random.Random(7)
    delays = [jittered(1.0, rng) for _ in range(1000)]
    assert all(1.0 - JITTER <= d <= 1.0 + JITTER for d in delays)
    assert len(set(delays)) > 900  # replicas seeded differently drift apart instead of probing in lockstep
