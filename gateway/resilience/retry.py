"""Whether a failed attempt may be retried: the route's retry policy and the cluster's retry budget.

The retry stage asks, in order: does the policy cover this failure (``retryable_failure`` / ``retryable_status``),
is the method safe to send twice (``method_retryable``), are attempts left (``RetryPolicy.attempts``), and does the
cluster's ``RetryBudget`` still allow a retry. The budget is the part that protects the upstream: per-request
attempt limits alone let retries multiply load by ``attempts`` exactly when the upstream is failing.

``RetryBudget`` follows Linkerd (tower's ``TpsBudget``): each original request deposits ``ratio`` of a retry, each
retry withdraws one, and a floor of ``min_per_second`` retries per second is always allowed so a low-traffic
service can still retry. Both deposits and withdrawals expire after ``window`` seconds. A retry is allowed while::

    ratio * requests_in_window + min_per_second * window - retries_in_window >= 1

``retry_after_delay`` reads an upstream's ``Retry-After`` (RFC 9110 section 10.2.3).

Pure: ``now`` is seconds on one monotonic clock; ``now_epoch`` is Unix time (HTTP dates are wall-clock).
"""

from __future__ import annotations

import math
from datetime import UTC
from email.utils import parsedate_to_datetime

from gateway.config.snapshot import RetryPolicy

__all__ = [
    "IDEMPOTENT_METHODS",
    "RetryBudget",
    "method_retryable",
    "retry_after_delay",
    "retryable_failure",
    "retryable_status",
]

# RFC 9110 section 9.2.2: methods whose intended effect of several identical requests is that of one. (CONNECT
# and PATCH are not; POST never is.) Method names are case-sensitive (section 9.1), so "get" is not GET.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

# Slack for float error when comparing the balance to one whole retry (0.2 x 5 requests must buy a retry).
_EPSILON = 1e-9
_SLOTS = 10


class RetryBudget:
    """Linkerd's retry budget over a sliding window, in a ring of ten slots (as tower's budget, which Linkerd uses).

    The window is split into 10 slots of ``window / 10`` seconds each: with fewer, a short window (one slot for
    ``window: 1s``) forgot every request at once at each slot boundary and refused retries exactly then.
    A request or retry is counted in the slot of its time and forgotten once that slot is reused, so it
    stays counted for between ``window - slot`` and ``window`` seconds. Running totals make every call O(1);
    moving to a later slot clears the skipped ones, at most ``slots`` of them however long the gap.
    """

    __slots__ = ("_head", "_requests", "_retries", "_slot", "_total_requests", "_total_retries", "ratio", "reserve")

    def __init__(self, ratio: float, min_per_second: float, window: float) -> None:
        if not ratio >= 0 or not min_per_second >= 0:  # also rejects NaN
            raise ValueError("retry budget ratio and min_per_second must be >= 0")
        if not 0 < window < math.inf:
            raise ValueError(f"retry budget window must be a positive number of seconds, got {window}")
        slots = _SLOTS
        self.ratio = ratio
        self.reserve = min_per_second * window  # retries allowed in any window with no traffic at all
        self._slot = window / slots  # seconds per slot
        self._requests = [0] * slots
        self._retries = [0] * slots
        self._total_requests = 0
        self._total_retries = 0
        self._head: int | None = None  # absolute index (now // slot) of the newest slot; None before the first call

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio}, reserve={self.reserve}, requests={self._total_requests}, "
            f"retries={self._total_retries})"
        )

    def _advance(self, now: float) -> int:
        """Move the ring to ``now``'s slot, forgetting what fell out of the window; the slot's ring position."""
        index = math.floor(now / self._slot)
        head = self._head
        size = len(self._requests)
        if head is None:
            self._head = index
        elif index > head:
            if index - head >= size:  # the whole window went by: forget everything
                for i in range(size):
                    self._requests[i] = 0
                    self._retries[i] = 0
                self._total_requests = 0
                self._total_retries = 0
            else:
                for absolute in range(head + 1, index + 1):
                    i = absolute % size
                    self._total_requests -= self._requests[i]
                    self._total_retries -= self._retries[i]
                    self._requests[i] = 0
                    self._retries[i] = 0
            self._head = index
        else:
            index = head  # same slot, or the clock stepped back: count into the newest slot
        return index % size

    def record_request(self, now: float) -> None:
        """An original request (not a retry) was sent: deposit ``ratio`` of a retry."""
        i = self._advance(now)
        self._requests[i] += 1
        self._total_requests += 1

    def remaining(self, now: float) -> float:
        """Retries still allowed in the window at ``now`` (may be fractional; a retry needs >= 1)."""
        self._advance(now)
        return self.ratio * self._total_requests + self.reserve - self._total_retries

    def try_withdraw(self, now: float) -> bool:
        """Withdraw one retry if the budget allows it; False (and nothing withdrawn) when exhausted."""
        i = self._advance(now)
        if self.ratio * self._total_requests + self.reserve - self._total_retries < 1 - _EPSILON:
            return False
        self._retries[i] += 1
        self._total_retries += 1
        return True


def retryable_failure(policy: RetryPolicy, kind: str) -> bool:
    """Whether an attempt that failed without a response is retried under ``policy``.

    ``kind`` is one of ``RETRY_CONDITIONS``: "connect-failure" (no connection: DNS, unreachable, connect timeout),
    "refused" (connection refused), "reset" (the connection dropped before response headers), "timeout" (the
    per-try timeout fired). Anything else is not retried.
    """
    return kind in policy.on


def retryable_status(policy: RetryPolicy, status: int) -> bool:
    """Whether a response with ``status`` is retried under ``policy`` (its ``statuses`` set)."""
    return status in policy.statuses


def method_retryable(policy: RetryPolicy, method: str) -> bool:
    """Whether a request with ``method`` may be sent again: idempotent per RFC 9110, or the route opted in."""
    return method in IDEMPOTENT_METHODS or policy.non_idempotent


def retry_after_delay(value: str | None, now_epoch: float) -> float | None:
    """Seconds to wait according to a ``Retry-After`` value, or None if absent or unparseable.

    Accepts delay-seconds (``120``) and an HTTP-date in any of the three RFC 9110 formats (IMF-fixdate, RFC 850,
    asctime; a date without a zone is GMT, as HTTP dates always are). A date in the past gives 0.0. The result is
    not capped: the caller bounds it by its own backoff limit and deadline.
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():  # delay-seconds = 1*DIGIT; isascii keeps out digits like "²"
        return float(value)  # a silly number of digits becomes inf, never an error
    try:
        when = parsedate_to_datetime(value)
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(when.timestamp() - now_epoch, 0.0)
