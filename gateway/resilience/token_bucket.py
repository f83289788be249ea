"""Token buckets for local rate limits: one bucket, and a bounded table of buckets keyed by client or principal.

A bucket holds at most ``burst`` tokens and gains ``rate`` tokens per second; a request takes one. It starts full,
so a new client may send ``burst`` requests at once and then ``rate`` per second. A refused ``take`` says how long
until the tokens will be there, which the rate-limit stage turns into ``Retry-After``.

Refill is computed from the time since the last call (no timers), so an idle bucket costs nothing. Pure: ``now`` is
seconds on one monotonic clock, the same for every call on a bucket.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["BucketTable", "TokenBucket"]

# Slack for float error in the refill arithmetic: 0.1 s x 10/s must buy a whole token, not 0.9999999999999998.
_EPSILON = 1e-9


def _check(rate: float, burst: float) -> None:
    if not rate > 0:  # also rejects NaN
        raise ValueError(f"token bucket rate must be > 0, got {rate}")
    if not burst > 0:
        raise ValueError(f"token bucket burst must be > 0, got {burst}")


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full at ``now``."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        _check(rate, burst)
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = now  # time up to which refill has been credited

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate}, burst={self.burst}, tokens={self._tokens:.3f})"

    def _refill(self, now: float) -> None:
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
            self._stamp = now
        # A clock step backwards credits nothing and keeps the stamp, so the same interval is never credited twice.

    def tokens(self, now: float) -> float:
        """Tokens available at ``now`` (reads, never writes)."""
        elapsed = now - self._stamp
        if elapsed <= 0:
            return self._tokens
        return min(self.burst, self._tokens + elapsed * self.rate)

    def full(self, now: float) -> bool:
        """Whether the bucket is full at ``now``, i.e. indistinguishable from a fresh one."""
        return self.tokens(now) >= self.burst - _EPSILON

    def take(self, now: float, n: float = 1) -> float:
        """Take ``n`` tokens: 0.0 when admitted (tokens consumed), else the seconds until ``n`` will be available.

        A refusal consumes nothing, so a client that keeps retrying too early is not pushed further back. ``n`` above
        ``burst`` could never be admitted and raises ``ValueError`` (a caller bug, not a client's fault).
        """
        if n > self.burst:
            raise ValueError(f"cannot take {n} tokens from a bucket with burst {self.burst}")
        self._refill(now)
        if self._tokens >= n - _EPSILON:
            self._tokens = max(self._tokens - n, 0.0)
            return 0.0
        return (n - self._tokens) / self.rate


class BucketTable:
    """Token buckets keyed by string (client address, principal, header value), at most ``max_keys`` of them.

    When a new key would exceed ``max_keys`` the least recently used bucket is dropped. Dropping loses nothing when
    that bucket had refilled to full, which is the usual case: the LRU bucket has been idle longest, and any bucket
    idle for ``burst / rate`` seconds is full, exactly what a new bucket for that key would be. Only when more than
    ``max_keys`` keys are active within ``burst / rate`` seconds does eviction forget a partly drained bucket, and
    that key gets a fresh burst: the table trades exactness under a key flood for bounded memory. Size
    ``max_keys`` above the number of distinct keys expected in that span.

    Every operation is O(1): an ``OrderedDict`` in recency order.
    """

    __slots__ = ("_buckets", "burst", "max_keys", "rate")

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        _check(rate, burst)
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def take(self, key: str, now: float, n: float = 1) -> float:
        """``TokenBucket.take`` on ``key``'s bucket, creating it full if absent (evicting the LRU one if needed)."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
            buckets[key] = bucket
            if len(buckets) > self.max_keys:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
        return bucket.take(now, n)
