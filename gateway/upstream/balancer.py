"""Load balancers: choose one ``Endpoint`` of a cluster per request attempt.

One class per policy in ``LB_POLICIES`` (``RingHash`` lives in ``ring_hash.py``, re-exported here with
``hash_key_64``); ``build_balancer`` maps a policy name to a fresh instance. Each balancer has two halves with
different budgets:

* ``update(endpoints)`` runs when the endpoint set changes (DNS refresh, config reload) and precomputes whatever
  ``pick`` needs: schedules, cumulative weights, the hash ring.
* ``pick(hash_key, now, avoid, panic=...)`` runs per attempt on the hot path: O(1) or O(log n) when the first
  candidate is usable, no per-call lists. Degraded cases (candidates unusable) fall back to a bounded linear scan.

Shared contract of ``pick``:

* endpoints for which ``Endpoint.usable(now, panic)`` is False (unhealthy, ejected, or breaker not admitting) are
  skipped; when none is usable the result is None and the caller decides (the pick stage replies 503).
* ``panic`` is Envoy's panic mode, decided by the caller (``state.panic_mode``): health and ejection are ignored,
  breakers still apply. The balancer only passes it on to ``usable``.
* ``avoid`` (the endpoint the previous attempt failed on) is passed over when any other usable endpoint exists,
  and returned when it is the only usable one, so a retry never fails for want of a *different* endpoint.
* ``pick`` never changes an endpoint; the caller reports the chosen one (``breaker.on_attempt``, ``start``).
* ``hash_key`` is used by ``ring_hash`` only; ``now`` by every policy for ``usable`` and by ``peak_ewma`` for cost.

Pure: randomness comes from the injected ``random.Random``, time from ``now``. Not thread-safe; one event loop.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from gateway.config.snapshot import LB_POLICIES, LbPolicy
from gateway.upstream.balancer_base import BalancerBase
from gateway.upstream.ring_hash import RingHash, hash_key_64  # hash_key_64: re-exported, see __all__
from gateway.upstream.state import Endpoint

__all__ = [
    "Balancer",
    "LeastRequest",
    "PeakEwma",
    "RandomBalancer",
    "RingHash",
    "RoundRobin",
    "WeightedRoundRobin",
    "build_balancer",
    "hash_key_64",
]

# Random draws before a random balancer gives up sampling and scans: enough that a single unusable or avoided
# endpoint almost never forces the scan, few enough that an outage costs little per request.
_SAMPLE_TRIES = 3
# Upper bound on the work (cycle length x endpoints) spent precomputing a smooth-WRR cycle in update(), ~15 ms of
# CPU here. Bigger weight sets run nginx's per-pick algorithm instead: same sequence, O(n) per pick.
_MAX_SCHEDULE_WORK = 1 << 18


@runtime_checkable
class Balancer(Protocol):
    """Chooses an endpoint per attempt. See the module docstring for the shared contract."""

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """The endpoint set of the last ``update``, in the order given."""
        ...

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        """Replace the endpoint set; precompute what ``pick`` needs (O(n) or O(n log n))."""
        ...

    def pick(
        self, hash_key: str | None, now: float, avoid: Endpoint | None = None, *, panic: bool = False
    ) -> Endpoint | None:
        """One usable endpoint, preferring one other than ``avoid``; None when none is usable."""
        ...


def _scan(
    endpoints: Sequence[Endpoint], start: int, avoid: Endpoint | None, now: float, panic: bool
) -> Endpoint | None:
    """The slow path: first usable endpoint other than ``avoid`` circularly from ``start``; else ``avoid`` if it
    is in the set and usable; else None."""
    n = len(endpoints)
    fallback: Endpoint | None = None
    i = start
    for _ in range(n):
        if i >= n:
            i = 0
        endpoint = endpoints[i]
        i += 1
        if endpoint.usable(now, panic):
            if endpoint is not avoid:
                return endpoint
            fallback = endpoint
    return fallback


class RoundRobin(BalancerBase):
    """Each usable endpoint in turn, ignoring weights."""

    __slots__ = ("_next",)

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._next = 0

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)
        # Start at a random offset, as Envoy does, so replicas restarted together do not all hit endpoint 0 first.
        self._next = self._rng.randrange(len(self._endpoints)) if self._endpoints else 0

    def pick(
        self, hash_key: str | None, now: float, avoid: Endpoint | None = None, *, panic: bool = False
    ) -> Endpoint | None:
        endpoints = self._endpoints
        n = len(endpoints)
        i = self._next
        fallback: Endpoint | None = None
        for _ in range(n):
            if i >= n:
                i = 0
            endpoint = endpoints[i]
            i += 1
            if endpoint.usable(now, panic):
                if endpoint is not avoid:
                    self._next = i
                    return endpoint
                fallback = endpoint
        return fallback


def _smooth_step(weights: Sequence[int], current: list[int], eligible: Sequence[bool]) -> int:
    """One step of nginx's smooth WRR over the eligible indices, updating ``current``; the chosen index or -1."""
    best = -1
    best_current = 0
    total = 0
    for i, weight in enumerate(weights):
        if not eligible[i]:
            continue
        value = current[i] + weight
        current[i] = value
        total += weight
        if best < 0 or value > best_current:  # strict '>': the first of equals wins, as in nginx
            best = i
            best_current = value
    if best >= 0:
        current[best] -= total
    return best


class WeightedRoundRobin(BalancerBase):
    """nginx's smooth weighted round robin: deterministic, each endpoint's turns spread evenly over the cycle.

    Every step each endpoint's ``current`` grows by its weight, the largest (first on ties) is chosen and loses the
    total weight. For weights 5,1,1 that gives ``a a b a c a a``. The cycle (total weight / gcd steps long) is
    precomputed in ``update`` so ``pick`` just walks it; an unusable endpoint's turns are skipped, which keeps
    the others' shares in proportion. When the cycle would be too costly to precompute, ``pick`` runs the same
    step live over the usable endpoints, as nginx itself does.
    """

    __slots__ = ("_current", "_next", "_schedule", "_weights")

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._schedule: tuple[Endpoint, ...] | None = ()
        self._next = 0
        self._weights: tuple[int, ...] = ()
        self._current: list[int] = []

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)
        self._next = 0
        divisor = math.gcd(*(e.weight for e in self._endpoints)) if self._endpoints else 1
        self._weights = tuple(e.weight // divisor for e in self._endpoints)
        self._current = [0] * len(self._endpoints)
        total = sum(self._weights)
        if total == len(self._endpoints):
            self._schedule = self._endpoints  # all weights equal: the cycle is plain round robin in list order
        elif total * len(self._endpoints) <= _MAX_SCHEDULE_WORK:
            current = [0] * len(self._endpoints)
            everyone = [True] * len(self._endpoints)  # the cycle covers all endpoints; pick skips unusable ones
            self._schedule = tuple(
                self._endpoints[_smooth_step(self._weights, current, everyone)] for _ in range(total)
            )
        else:
            self._schedule = None

    def pick(
        self, hash_key: str | None, now: float, avoid: Endpoint | None = None, *, panic: bool = False
    ) -> Endpoint | None:
        schedule = self._schedule
        if schedule is None:
            eligible = [e.usable(now, panic) and e is not avoid for e in self._endpoints]
            best = _smooth_step(self._weights, self._current, eligible)
            if best >= 0:
                return self._endpoints[best]
            return avoid if avoid is not None and avoid.usable(now, panic) and avoid in self._endpoints else None
        n = len(schedule)
        i = self._next
        fallback: Endpoint | None = None
        for _ in range(n):  # one pass at most; only reached past the first entry when some are unusable
            if i >= n:
                i = 0
            endpoint = schedule[i]
            i += 1
            if endpoint.usable(now, panic):
                if endpoint is not avoid:
                    self._next = i
                    return endpoint
                fallback = endpoint
        return fallback


class RandomBalancer(BalancerBase):
    """Random choice, probability proportional to weight (bisect over cumulative weights; O(1) if all equal)."""

    __slots__ = ("_cumulative", "_total")

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._cumulative: list[int] | None = None  # None = all weights equal
        self._total = 0

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)
        weights = [e.weight for e in self._endpoints]
        if len(set(weights)) <= 1:
            self._cumulative = None
            self._total = len(weights)
            return
        running = 0
        cumulative = []
        for weight in weights:
            running += weight
            cumulative.append(running)
        self._cumulative = cumulative
        self._total = running

    def pick(
        self, hash_key: str | None, now: float, avoid: Endpoint | None = None, *, panic: bool = False
    ) -> Endpoint | None:
        endpoints = self._endpoints
        n = len(endpoints)
        if n == 0:
            return None
        rng = self._rng
        cumulative = self._cumulative
        # Rejection sampling keeps the weighted distribution exact over the eligible endpoints.
        for _ in range(_SAMPLE_TRIES):
            if cumulative is None:
                endpoint = endpoints[rng.randrange(n)]
            else:
                endpoint = endpoints[bisect_right(cumulative, rng.randrange(self._total))]
            if endpoint is not avoid and endpoint.usable(now, panic):
                return endpoint
        return _scan(endpoints, rng.randrange(n), avoid, now, panic)


class _PowerOfTwoChoices(BalancerBase):
    """Sample two distinct endpoints uniformly, keep the one with the lower ``_load``.

    P2C gets close to "least loaded" without reading every endpoint, and the randomness keeps many independent
    gateways from all piling onto the same momentarily idle endpoint (the herd a global argmin causes).
    """

    __slots__ = ()

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)

    def _load(self, endpoint: Endpoint, now: float) -> float:
        raise NotImplementedError

    def pick(
        self, hash_key: str | None, now: float, avoid: Endpoint | None = None, *, panic: bool = False
    ) -> Endpoint | None:
        endpoints = self._endpoints
        n = len(endpoints)
        if n < 2:
            return endpoints[0] if n == 1 and endpoints[0].usable(now, panic) else None
        rng = self._rng
        for _ in range(_SAMPLE_TRIES):
            i = rng.randrange(n)
            j = rng.randrange(n - 1)
            if j >= i:  # two distinct indices without a retry loop
                j += 1
            a = endpoints[i]
            b = endpoints[j]
            a_ok = a is not avoid and a.usable(now, panic)
            b_ok = b is not avoid and b.usable(now, panic)
            if a_ok and b_ok:
                # Strict '<': on a tie the first (uniformly random) sample wins, so ties are broken at random.
                return b if self._load(b, now) < self._load(a, now) else a
            if a_ok:
                return a
            if b_ok:
                return b
        return _scan(endpoints, rng.randrange(n), avoid, now, panic)


class LeastRequest(_PowerOfTwoChoices):
    """P2C on in-flight requests (Envoy's LEAST_REQUEST, choice_count 2).

    Load is ``(in_flight + 1) / weight``, which is exactly "fewer in-flight wins" when weights are equal and lets a
    weight-2 endpoint carry twice the concurrency otherwise.
    """

    __slots__ = ()

    def _load(self, endpoint: Endpoint, now: float) -> float:
        return (endpoint.in_flight + 1) / endpoint.weight


class PeakEwma(_PowerOfTwoChoices):
    """P2C on ``Endpoint.cost`` (latency estimate x queued work), Linkerd's default balancer; cost / weight."""

    __slots__ = ()

    def _load(self, endpoint: Endpoint, now: float) -> float:
        return endpoint.cost(now) / endpoint.weight


_FACTORIES: dict[LbPolicy, Callable[[random.Random], Balancer]] = {
    "round_robin": RoundRobin,
    "weighted_round_robin": WeightedRoundRobin,
    "random": RandomBalancer,
    "least_request": LeastRequest,
    "peak_ewma": PeakEwma,
    "ring_hash": RingHash,
}
assert set(_FACTORIES) == set(LB_POLICIES), "every LbPolicy needs a balancer"


def build_balancer(policy: LbPolicy, rng: random.Random) -> Balancer:
    """A new, empty balancer for ``policy``; call ``update`` with the endpoints before the first ``pick``."""
    try:
        factory = _FACTORIES[policy]
    except KeyError:
        raise ValueError(f"unknown load-balancing policy {policy!r}") from None
    return factory(rng)
