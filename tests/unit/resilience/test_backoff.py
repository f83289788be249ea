"""Full-jitter backoff: uniform below min(cap, base * 2**retry), never above the cap, mean about half."""

from __future__ import annotations

import random
import statistics

import pytest

from gateway.resilience.backoff import full_jitter


class Highest(random.Random):
    """An rng whose uniform() returns the top of the range: exposes the ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.mark.parametrize(
    ("retry", "base", "cap", "ceiling"),
    [
        (0, 0.025, 0.250, 0.025),  # the first retry waits up to base
        (1, 0.025, 0.250, 0.050),
        (2, 0.025, 0.250, 0.100),
        (3, 0.025, 0.250, 0.200),
        (4, 0.025, 0.250, 0.250),  # 0.4 capped
        (50, 0.025, 0.250, 0.250),
        (5000, 0.025, 0.250, 0.250),  # no OverflowError for absurd counts
        (3, 0.0, 1.0, 0.0),
        (3, 1.0, 0.0, 0.0),
    ],
)
def test_ceiling(retry: int, base: float, cap: float, ceiling: float) -> None:
    assert full_jitter(retry, base, cap, Highest(0)) == pytest.approx(ceiling)


@pytest.mark.parametrize("retry", range(8))
def test_samples_stay_in_bounds_and_average_half_the_ceiling(retry: int) -> None:
    rng = random.Random(retry)
    ceiling = min(1.0, 0.01 * 2**retry)
    samples = [full_jitter(retry, 0.01, 1.0, rng) for _ in range(20_000)]
    assert all(0.0 <= s <= ceiling for s in samples)
    assert statistics.fmean(samples) == pytest.approx(ceiling / 2, rel=0.03)
    assert max(samples) > 0.99 * ceiling  # the whole range is used, not just the top
    assert min(samples) < 0.01 * ceiling


def test_same_seed_same_delays() -> None:
    first = [full_jitter(r, 0.1, 2.0, random.Random(5)) for r in range(6)]
    again = [full_jitter(r, 0.1, 2.0, random.Random(5)) for r in range(6)]
    assert first == again


@pytest.mark.parametrize(
    ("retry", "base", "cap", "message"),
    [(-1, 0.1, 1.0, "retry must be >= 0"), (0, -0.1, 1.0, "must be >= 0"), (0, 0.1, -1.0, "must be >= 0")],
)
def test_rejects_bad_arguments(retry: int, base: float, cap: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        full_jitter(retry, base, cap, random.Random(0))
