"""The sampler: parent decisions followed, the trace-id ratio rule, and the per-second cap on new traces."""

from __future__ import annotations

import random

import pytest

from telemetry.sampling import Sampler

LOW = (1 << 64) - 1


@pytest.mark.parametrize("parent", [True, False])
def test_parent_decision_is_followed_whatever_the_ratio(parent: bool) -> None:
    for ratio in (0.0, 0.5, 1.0):
        assert Sampler(ratio).sample(parent, 123, 0.0) is parent


def test_parent_decision_is_not_capped() -> None:
    sampler = Sampler(1.0, max_per_second=1)
    assert all(sampler.sample(True, n, 0.0) for n in range(100))


@pytest.mark.parametrize(
    ("ratio", "trace_id", "expected"),
    [
        (0.0, 0, False),
        (1.0, LOW, True),
        (0.5, (1 << 63) - 1, True),  # just under the bound
        (0.5, 1 << 63, False),  # at the bound
        (0.5, (0xFFFF << 64) | 5, True),  # only the low 64 bits count, as in OpenTelemetry's TraceIdRatioBased
    ],
)
def test_ratio_rule(ratio: float, trace_id: int, expected: bool) -> None:
    assert Sampler(ratio).sample(None, trace_id, 0.0) is expected


def test_ratio_matches_opentelemetry() -> None:
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    rng = random.Random(7)
    theirs = TraceIdRatioBased(0.25)
    ours = Sampler(0.25)
    for _ in range(2000):
        trace_id = rng.getrandbits(128)
        expected = theirs.should_sample(None, trace_id, "x").decision.is_sampled()
        assert ours.sample(None, trace_id, 0.0) is expected


def test_ratio_share() -> None:
    rng = random.Random(1)
    sampler = Sampler(0.1)
    kept = sum(sampler.sample(None, rng.getrandbits(128), 0.0) for _ in range(20_000))
    assert 1700 < kept < 2300


def test_rate_cap_with_an_injected_clock() -> None:
    sampler = Sampler(1.0, max_per_second=5)
    now = 100.0
    first_second = [sampler.sample(None, n + 1, now) for n in range(20)]
    assert sum(first_second) == 5  # the burst is one second's worth
    assert not sampler.sample(None, 99, now + 0.1)  # 0.5 tokens refilled: not yet
    assert sampler.sample(None, 99, now + 0.2)  # one token now
    later = [sampler.sample(None, n + 1, now + 10.0) for n in range(20)]
    assert sum(later) == 5  # refilled, but never above the burst


def test_rate_cap_below_one_per_second() -> None:
    sampler = Sampler(1.0, max_per_second=0.5)
    assert sampler.sample(None, 1, 10.0)
    assert not sampler.sample(None, 1, 11.0)
    assert sampler.sample(None, 1, 12.0)
