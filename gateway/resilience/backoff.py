"""Backoff between retries: exponential with AWS "full jitter".

``full_jitter`` draws the delay uniformly from ``[0, min(cap, base * 2**retry)]``. Spreading retries over the
whole interval, rather than around its top, de-synchronises clients that failed together, which is what keeps a
retry storm from hitting the recovering upstream in waves (AWS Architecture Blog, "Exponential Backoff And
Jitter", 2015). The mean delay is half the ceiling.

Pure: randomness comes from the injected ``random.Random``.
"""

from __future__ import annotations

import random

__all__ = ["full_jitter"]

# 2**1000 already exceeds any sane cap / base ratio; clamping the exponent keeps 2.0**retry from overflowing
# (OverflowError) for absurd retry counts.
_MAX_EXPONENT = 1000


def full_jitter(retry: int, base: float, cap: float, rng: random.Random) -> float:
    """Seconds to wait before retry ``retry`` (0 = the first retry): uniform in [0, min(cap, base * 2**retry)]."""
    if retry < 0:
        raise ValueError(f"retry must be >= 0, got {retry}")
    if base < 0 or cap < 0:
        raise ValueError("backoff base and cap must be >= 0")
    ceiling = min(cap, base * 2.0 ** min(retry, _MAX_EXPONENT))  # an inf product is capped, never raised
    return rng.uniform(0.0, ceiling)
