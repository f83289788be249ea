"""Retry budget accounting over a sliding window; the retry-policy predicates (kind, status, method, Retry-After)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from gateway.config.snapshot import RetryPolicy
from gateway.resilience.retry import (
    IDEMPOTENT_METHODS,
    RetryBudget,
    method_retryable,
    retry_after_delay,
    retryable_failure,
    retryable_status,
)

# ---- RetryBudget ----------------------------------------------------------------------------------------------


def retries_allowed(budget: RetryBudget, now: float, limit: int = 10_000) -> int:
    """Withdraw until refused; how many were allowed."""
    allowed = 0
    while allowed < limit and budget.try_withdraw(now):
        allowed += 1
    return allowed


@pytest.mark.parametrize(
    ("ratio", "min_per_second", "window", "requests", "allowed"),
    [
        (0.2, 10.0, 10.0, 0, 100),  # Linkerd's defaults, idle: the floor alone, 10/s over 10 s
        (0.2, 0.0, 10.0, 100, 20),  # 20% of the requests in the window
        (0.2, 0.0, 10.0, 5, 1),  # 0.2 x 5 is exactly one retry (no float shortfall)
        (0.2, 0.0, 10.0, 4, 0),  # 0.8 of a retry is not a retry
        (0.2, 1.0, 10.0, 100, 30),  # 20 from traffic + 10 from the floor
        (0.5, 0.0, 5.0, 7, 3),  # 3.5 rounds down
        (0.0, 0.0, 10.0, 1000, 0),  # retries disabled
        (1.0, 0.0, 10.0, 3, 3),
        (0.2, 2.0, 2.5, 0, 5),  # a fractional window: the floor is min_per_second x window
    ],
)
def test_budget_table(ratio: float, min_per_second: float, window: float, requests: int, allowed: int) -> None:
    budget = RetryBudget(ratio, min_per_second, window)
    for _ in range(requests):
        budget.record_request(1.0)
    assert retries_allowed(budget, 1.0) == allowed


def test_withdrawals_and_deposits_interleave() -> None:
    budget = RetryBudget(0.2, 0.0, 10.0)
    outcomes = []
    for _ in range(20):
        budget.record_request(0.5)
        outcomes.append(budget.try_withdraw(0.5))
    # Every fifth request earns one retry; each retry is spent as soon as it is earned.
    assert outcomes == [False, False, False, False, True] * 4


def test_remaining_reports_the_balance() -> None:
    budget = RetryBudget(0.2, 1.0, 10.0)
    assert budget.remaining(0.0) == pytest.approx(10.0)
    for _ in range(10):
        budget.record_request(0.0)
    assert budget.remaining(0.0) == pytest.approx(12.0)
    assert budget.try_withdraw(0.0)
    assert budget.remaining(0.0) == pytest.approx(11.0)


def test_old_requests_expire_after_the_window() -> None:
    budget = RetryBudget(0.2, 0.0, 10.0)
    for _ in range(50):
        budget.record_request(0.0)  # slot [0, 1)
    for _ in range(50):
        budget.record_request(5.0)  # slot [5, 6)
    assert budget.remaining(9.99) == pytest.approx(20.0)
    assert budget.remaining(10.0) == pytest.approx(10.0)  # the t=0 slot is reused: its requests are gone
    assert budget.remaining(15.0) == pytest.approx(0.0)
    assert not budget.try_withdraw(15.0)


def test_retries_expire_too_so_the_budget_refills() -> None:
    budget = RetryBudget(0.2, 1.0, 10.0)
    assert retries_allowed(budget, 0.0) == 10
    assert not budget.try_withdraw(9.5)  # still in the window
    assert retries_allowed(budget, 10.0) == 10  # the window moved past the withdrawals


def test_a_request_counts_for_between_window_minus_one_slot_and_window() -> None:
    budget = RetryBudget(1.0, 0.0, 3.0)  # ten slots of 0.3 s
    budget.record_request(0.9)  # the slot [0.9, 1.2)
    assert budget.remaining(3.899) == pytest.approx(1.0)
    assert budget.remaining(3.9) == pytest.approx(0.0)  # that slot is reused: 3.0 s after it was recorded


def test_a_one_second_window_forgets_gradually_not_all_at_once() -> None:
    budget = RetryBudget(1.0, 0.0, 1.0)
    budget.record_request(0.05)
    budget.record_request(0.55)
    assert budget.remaining(0.99) == pytest.approx(2.0)
    assert budget.remaining(1.0) == pytest.approx(1.0)  # the first is gone, the second still counts
    assert budget.remaining(1.5) == pytest.approx(0.0)  # a one-slot ring forgot both at once at 1.0


def test_a_long_gap_forgets_everything_in_bounded_work() -> None:
    budget = RetryBudget(0.2, 0.0, 10.0)
    for _ in range(100):
        budget.record_request(0.0)
    assert budget.try_withdraw(0.0)
    assert budget.remaining(1e9) == 0.0  # one clear of the ring, not a billion slot steps
    budget.record_request(1e9)
    assert budget.remaining(1e9) == pytest.approx(0.2)


def test_clock_stepping_back_counts_into_the_newest_slot() -> None:
    budget = RetryBudget(1.0, 0.0, 10.0)
    budget.record_request(50.0)
    budget.record_request(45.0)  # earlier than the newest slot: counted there, not in a recycled slot
    assert budget.remaining(50.0) == pytest.approx(2.0)
    assert budget.remaining(59.999) == pytest.approx(2.0)
    assert budget.remaining(60.0) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("ratio", "min_per_second", "window", "message"),
    [
        (-0.1, 1.0, 10.0, "ratio and min_per_second must be >= 0"),
        (0.2, -1.0, 10.0, "ratio and min_per_second must be >= 0"),
        (float("nan"), 1.0, 10.0, "ratio and min_per_second must be >= 0"),
        (0.2, 1.0, 0.0, "window must be a positive number"),
        (0.2, 1.0, math.inf, "window must be a positive number"),
    ],
)
def test_budget_rejects_bad_settings(ratio: float, min_per_second: float, window: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryBudget(ratio, min_per_second, window)


# ---- policy predicates ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("on", "kind", "retryable"),
    [
        (None, "connect-failure", True),  # the default policy: connection-level failures only
        (None, "refused", True),
        (None, "reset", True),
        (None, "timeout", False),  # a per-try timeout may have reached the upstream: opt-in
        (frozenset({"timeout"}), "timeout", True),
        (frozenset({"timeout"}), "reset", False),
        (None, "cancelled", False),  # not a retry condition at all
        (None, "", False),
    ],
)
def test_retryable_failure(on: frozenset[str] | None, kind: str, retryable: bool) -> None:
    policy = RetryPolicy() if on is None else RetryPolicy(on=on)  # type: ignore[arg-type]  # str, not RetryOn
    assert retryable_failure(policy, kind) is retryable


@pytest.mark.parametrize(
    ("statuses", "status", "retryable"),
    [
        (frozenset(), 503, False),  # the default retries no status
        (frozenset({502, 503, 504}), 503, True),
        (frozenset({502, 503, 504}), 500, False),
        (frozenset({502, 503, 504}), 200, False),
        (frozenset({429}), 429, True),
    ],
)
def test_retryable_status(statuses: frozenset[int], status: int, retryable: bool) -> None:
    assert retryable_status(RetryPolicy(statuses=statuses), status) is retryable


@pytest.mark.parametrize(
    ("method", "default", "opted_in"),
    [
        ("GET", True, True),
        ("HEAD", True, True),
        ("OPTIONS", True, True),
        ("TRACE", True, True),
        ("PUT", True, True),
        ("DELETE", True, True),
        ("POST", False, True),
        ("PATCH", False, True),
        ("CONNECT", False, True),
        ("PROPFIND", False, True),  # unknown methods are not assumed safe
        ("get", False, True),  # method names are case-sensitive (RFC 9110 section 9.1)
    ],
)
def test_method_idempotency_table(method: str, default: bool, opted_in: bool) -> None:
    assert method_retryable(RetryPolicy(), method) is default
    assert method_retryable(RetryPolicy(non_idempotent=True), method) is opted_in


def test_idempotent_methods_are_rfc_9110s() -> None:
    assert frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"}) == IDEMPOTENT_METHODS


# ---- Retry-After ----------------------------------------------------------------------------------------------

NOW = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "delay"),
    [
        (None, None),
        ("120", 120.0),
        ("0", 0.0),
        (" 5 ", 5.0),  # surrounding whitespace is not part of the value
        ("007", 7.0),
        ("Fri, 01 Mar 2024 12:00:30 GMT", 30.0),  # IMF-fixdate
        ("Friday, 01-Mar-24 12:01:00 GMT", 60.0),  # RFC 850 (obsolete, still accepted)
        ("Fri Mar  1 12:00:10 2024", 10.0),  # asctime (obsolete, still accepted); no zone = GMT
        ("Fri, 01 Mar 2024 11:00:00 GMT", 0.0),  # in the past: retry now
        ("", None),
        ("   ", None),
        ("-1", None),
        ("1.5", None),
        ("5s", None),
        ("soon", None),
        ("\u00b2", None),  # a Unicode digit is not a DIGIT
        ("\u0661\u0662", None),  # nor are Arabic-Indic digits
        ("Fri, 01 Mar 2024 25:00:00 GMT", None),  # no 25th hour
        ("Fri, 32 Mar 2024 12:00:00 GMT", None),
    ],
)
def test_retry_after_delay(value: str | None, delay: float | None) -> None:
    result = retry_after_delay(value, NOW)
    if delay is None:
        assert result is None
    else:
        assert result == pytest.approx(delay)


def test_retry_after_http_date_round_trip() -> None:
    when = datetime.fromtimestamp(NOW + 3600, tz=UTC)
    assert retry_after_delay(format_datetime(when, usegmt=True), NOW) == pytest.approx(3600.0)


def test_retry_after_absurd_number_is_infinite_not_an_error() -> None:
    assert retry_after_delay("9" * 400, NOW) == math.inf
