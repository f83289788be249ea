"""Which traces are recorded: parent-based, then a trace-id ratio, then an optional rate cap. Pure (clock injected).

- A parent's decision is followed (``ParentBased`` in OpenTelemetry terms): a trace is recorded whole or not at all,
  whichever hop started it. A parent that left the decision open (B3 without a sampling state) counts as no parent.
- A new trace is kept when the low 64 bits of its id fall under ``ratio * 2**64``: the same rule as OpenTelemetry's
  ``TraceIdRatioBased``, so every hop using the same ratio takes the same decision for the same trace.
- ``max_per_second`` caps new sampled traces with a token bucket (burst = one second's worth). None of OpenTelemetry,
  Envoy, Linkerd or Traefik ships this for a proxy; it bounds export cost under a traffic spike, where a ratio alone
  scales it with load. Followed parents are not capped: dropping them would break traces other services record.
"""

from __future__ import annotations

__all__ = ["Sampler"]

_LOW_64 = (1 << 64) - 1


class Sampler:
    __slots__ = ("_bound", "_capacity", "_last", "_rate", "_tokens")

    def __init__(self, ratio: float, max_per_second: float | None = None) -> None:
        self._bound = round(max(0.0, min(1.0, ratio)) * (1 << 64))
        self._rate = max_per_second
        self._capacity = max(1.0, max_per_second) if max_per_second is not None else 0.0
        self._tokens = self._capacity
        self._last = 0.0

    def sample(self, parent_sampled: bool | None, trace_id: int, now: float) -> bool:
        """Record this trace? ``parent_sampled`` is None for a new trace; ``now`` is a monotonic clock in seconds."""
        if parent_sampled is not None:
            return parent_sampled
        if (trace_id & _LOW_64) >= self._bound:
            return False
        if self._rate is None:
            return True
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
