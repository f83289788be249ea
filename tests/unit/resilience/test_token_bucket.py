"""Token buckets: refill at the rate, capped at the burst, Retry-After for refusals; the bounded LRU table."""

from __future__ import annotations

import pytest

from gateway.resilience.token_bucket import BucketTable, TokenBucket


@pytest.mark.parametrize(
    ("rate", "burst", "calls"),
    [
        # (now, expected take() result): 0.0 = admitted, else seconds until a token
        (1.0, 1, [(0.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.0, 0.0), (1.0, 1.0)]),
        (2.0, 3, [(0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.5), (0.5, 0.0), (0.5, 0.5)]),  # starts full: burst
        (10.0, 2, [(0.0, 0.0), (0.0, 0.0), (0.05, 0.05), (0.1, 0.0), (0.1, 0.1)]),  # refusals consume nothing
        (4.0, 2, [(0.0, 0.0), (0.0, 0.0), (100.0, 0.0), (100.0, 0.0), (100.0, 0.25)]),  # idle refills only to burst
        (0.5, 1, [(0.0, 0.0), (1.0, 1.0), (2.0, 0.0)]),  # slow rates: Retry-After of whole seconds
    ],
)
def test_take_sequence(rate: float, burst: int, calls: list[tuple[float, float]]) -> None:
    bucket = TokenBucket(rate, burst, now=0.0)
    results = [bucket.take(now) for now, _ in calls]
    assert results == pytest.approx([expected for _, expected in calls])


def test_refill_accumulates_over_many_small_steps() -> None:
    bucket = TokenBucket(10.0, 5, now=0.0)
    for _ in range(5):
        assert bucket.take(0.0) == 0.0
    admitted = sum(bucket.take(i * 0.01) == 0.0 for i in range(1, 101))  # one second in 10 ms steps
    assert admitted == 10


def test_take_several_tokens() -> None:
    bucket = TokenBucket(2.0, 4, now=0.0)
    assert bucket.take(0.0, 3) == 0.0
    assert bucket.take(0.0, 3) == pytest.approx(1.0)  # 1 left, 2 more at 2/s
    assert bucket.take(1.0, 3) == 0.0


def test_more_than_burst_can_never_be_taken() -> None:
    with pytest.raises(ValueError, match="cannot take 3 tokens from a bucket with burst 2"):
        TokenBucket(1.0, 2, now=0.0).take(0.0, 3)


def test_tokens_and_full_only_read() -> None:
    bucket = TokenBucket(1.0, 2, now=0.0)
    assert bucket.full(0.0)
    bucket.take(0.0)
    bucket.take(0.0)
    assert bucket.tokens(1.5) == pytest.approx(1.5)
    assert bucket.tokens(1.5) == pytest.approx(1.5)
    assert not bucket.full(1.5)
    assert bucket.full(2.0)
    assert bucket.tokens(10.0) == 2


def test_clock_stepping_back_credits_nothing_twice() -> None:
    bucket = TokenBucket(1.0, 1, now=10.0)
    assert bucket.take(10.0) == 0.0
    assert bucket.take(9.0) == pytest.approx(1.0)  # earlier than the last call: no refill
    assert bucket.take(10.5) == pytest.approx(0.5)  # and the stamp stayed at 10.0
    assert bucket.take(11.0) == 0.0


@pytest.mark.parametrize(
    ("rate", "burst", "message"),
    [
        (0.0, 1, "rate must be > 0"),
        (-1.0, 1, "rate must be > 0"),
        (float("nan"), 1, "rate must be > 0"),
        (1.0, 0, "burst must be > 0"),
    ],
)
def test_rejects_bad_parameters(rate: float, burst: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenBucket(rate, burst, now=0.0)
    with pytest.raises(ValueError, match=message):
        BucketTable(rate, burst)


# ---- BucketTable ----------------------------------------------------------------------------------------------


def test_keys_have_independent_buckets() -> None:
    table = BucketTable(1.0, 1)
    assert table.take("alice", 0.0) == 0.0
    assert table.take("alice", 0.0) == pytest.approx(1.0)
    assert table.take("bob", 0.0) == 0.0
    assert len(table) == 2


def test_least_recently_used_key_is_evicted() -> None:
    table = BucketTable(1.0, 1, max_keys=2)
    table.take("a", 0.0)
    table.take("b", 0.0)
    table.take("a", 0.1)  # touch a: b is now the least recently used
    table.take("c", 0.2)
    assert len(table) == 2
    assert "b" not in table
    assert "a" in table
    assert "c" in table
    assert table.take("a", 0.3) == pytest.approx(0.7)  # a kept its drained state


def test_evicted_key_comes_back_with_a_full_bucket() -> None:
    table = BucketTable(1.0, 2, max_keys=1)
    table.take("a", 0.0)
    table.take("a", 0.0)
    assert table.take("a", 0.0) == pytest.approx(1.0)
    table.take("b", 0.0)  # evicts a, drained
    assert "a" not in table
    # The documented cost of a key flood: a evicted while drained gets a fresh burst.
    assert [table.take("a", 0.0), table.take("a", 0.0)] == [0.0, 0.0]


def test_memory_stays_bounded_under_a_key_flood() -> None:
    table = BucketTable(5.0, 10, max_keys=100)
    for i in range(10_000):
        table.take(f"client-{i}", i * 0.001)
    assert len(table) == 100
    assert "client-9999" in table
    assert "client-9899" not in table


def test_rejects_bad_max_keys() -> None:
    with pytest.raises(ValueError, match="max_keys must be >= 1"):
        BucketTable(1.0, 1, max_keys=0)
