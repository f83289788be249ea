"""Resilience state machines: rate limiting, retries, backoff and circuit breaking, pure.

Each of these modules holds one small state machine or a few pure functions and does no I/O: time comes in as ``now``
(seconds on one monotonic clock, unless a name says ``epoch``) and randomness as an injected ``random.Random``,
so every transition is reproducible in a table-driven test. The stages (rate limit, retry, pick, forward) own the
instances and feed them outcomes; telemetry reads their public counters.

* ``token_bucket``: ``TokenBucket`` and the bounded per-key ``BucketTable`` (local rate limits, Retry-After).
* ``backoff``: ``full_jitter`` exponential backoff between retries (AWS "full jitter").
* ``retry``: Linkerd's ``RetryBudget`` and the retry-policy predicates (failure kind, status, method, Retry-After).
* ``breaker``: the per-endpoint consecutive-failure ``Breaker`` (closed / tripped / probing) and the cluster-level
  ``Admission`` thresholds (Envoy's max_requests / max_pending).

The one exception to "pure" is ``redis_limiter``, the I/O adapter for shared rate limits; it falls back to the
local ``token_bucket`` when Redis cannot answer.
"""
