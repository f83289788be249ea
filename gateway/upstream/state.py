"""Runtime state of one upstream endpoint: in-flight count, peak-EWMA latency, health, ejection, breaker.

An ``Endpoint`` is the mutable handle that balancers choose between and the forward stage reports into. It is keyed
by ``(cluster, address)`` and survives config reloads and DNS refreshes (``discovery.reconcile`` keeps the object),
so its counters and latency estimate are not reset by a swap. A request that is in flight on an endpoint that a
refresh removed still holds the object and reports into it harmlessly.

Pure: time always comes in as ``now`` (seconds on any monotonic clock, the same one for every call).

Latency is tracked the way Finagle's ``PeakEwma`` and tower's ``load::PeakEwma`` (which Linkerd balances with) do:

* an RTT above the estimate replaces it at once (the peak), so one slow response makes the endpoint expensive now;
* an RTT at or below it pulls the estimate toward itself with weight ``1 - exp(-elapsed / decay)``, so recovery is
  paced by wall time, not by how many requests happened to complete;
* the cost is ``estimate * (in_flight + 1)``, i.e. the expected wait behind the work already queued there.

Those implementations decay the estimate toward zero every time the balancer reads the load (a zero-latency
observation). ``cost`` does the same thing without writing: it reports ``estimate * exp(-idle / decay)``, where
``idle`` is the time since the last sample. Exponential decay compounds, so this equals their repeated in-place
decay, and reading the cost twice in one pick cannot change it. The decay matters: an endpoint that was slow once and
then lost every comparison would otherwise never be tried again and could never show it has recovered.

An endpoint with no RTT sample yet costs ``default_rtt`` while idle and a large ``PENALTY`` (plus its in-flight
count) while its first requests are outstanding, as in Finagle: a new or hung endpoint takes one request at a time
until it has answered once, instead of soaking up a burst on the strength of a guessed latency.

Three independent things can take an endpoint out of rotation, and ``usable(now, panic)`` combines them for the
balancers:

* ``healthy``: set by active health checks (``health.py``); True until a check says otherwise.
* outlier ejection (``outlier.py``): out until ``ejected_until``; the detector's counters live here too.
* the circuit breaker (``breaker``, a ``resilience.breaker.Breaker``): tripped, or probing with its one probe out.

In panic mode (``panic_mode``: too few endpoints are healthy and not ejected, Envoy's panic threshold) health and
ejection are ignored, because spreading load over every endpoint beats piling it onto the few survivors and
toppling them too. The breaker still applies even then: it reflects what this gateway's own requests just saw.
All of this is ordinary state on the same object, so it survives reloads and DNS refreshes like the counters do.
"""

from __future__ import annotations

import math
from collections.abc import Collection

from gateway.config.snapshot import Address, CircuitBreaker
from gateway.resilience.breaker import Breaker

__all__ = ["DEFAULT_CIRCUIT_BREAKER", "DEFAULT_DECAY", "DEFAULT_RTT", "PENALTY", "Endpoint", "panic_mode"]

DEFAULT_RTT = 0.030  # seconds; linkerd2-proxy's EWMA_DEFAULT_RTT: a plausible in-cluster latency, neither 0 nor huge
DEFAULT_DECAY = 10.0  # seconds; linkerd2-proxy's EWMA_DECAY
PENALTY = 1e6  # cost of an endpoint still waiting for its first answer; dwarfs any real cost (seconds x requests)
DEFAULT_CIRCUIT_BREAKER = CircuitBreaker()


class Endpoint:
    """One upstream endpoint's runtime state. Identity matters: balancers compare endpoints with ``is``.

    Pair every ``start()`` with exactly one ``finish()`` or ``abandon()``.
    """

    __slots__ = (
        "_decay",
        "_default_rtt",
        "_estimate",
        "_sampled_at",
        "address",
        "breaker",
        "cluster",
        "consecutive_failures_5xx",
        "ejected_until",
        "healthy",
        "in_flight",
        "key",
        "times_ejected",
        "weight",
    )

    def __init__(
        self,
        cluster: str,
        address: Address,
        weight: int = 1,
        *,
        default_rtt: float = DEFAULT_RTT,
        decay: float = DEFAULT_DECAY,
        circuit_breaker: CircuitBreaker = DEFAULT_CIRCUIT_BREAKER,
    ) -> None:
        if weight < 1:
            raise ValueError(f"endpoint weight must be >= 1, got {weight}")
        if default_rtt <= 0 or decay <= 0:
            raise ValueError("default_rtt and decay must be positive")
        self.cluster = cluster
        self.address = address
        self.weight = weight
        self.key = str(address)  # the ring-hash identity and the reconcile key: stable across processes
        self.in_flight = 0
        self.healthy = True  # active health checks clear and set it; endpoints start in rotation
        self.breaker = Breaker(circuit_breaker)  # settings follow reloads via breaker.reconfigure()
        # Outlier detection bookkeeping (see outlier.py): out of rotation while now < ejected_until.
        self.ejected_until = 0.0
        self.times_ejected = 0
        self.consecutive_failures_5xx = 0
        self._default_rtt = default_rtt
        self._decay = decay
        self._estimate = default_rtt  # seconds
        self._sampled_at: float | None = None  # time of the last RTT sample; None = never answered yet

    def __repr__(self) -> str:
        return f"Endpoint({self.cluster!r}, {self.key!r}, weight={self.weight}, in_flight={self.in_flight})"

    def usable(self, now: float, panic: bool = False) -> bool:
        """Whether a balancer may choose this endpoint at ``now``: healthy, not ejected, and its breaker admits.

        With ``panic`` health and ejection are ignored (see the module docstring); the breaker never is.
        """
        if not panic and (not self.healthy or now < self.ejected_until):
            return False
        return self.breaker.admits(now)

    def ejected_at(self, now: float) -> bool:
        """Whether outlier detection holds the endpoint out at ``now`` (it returns once ``ejected_until`` passes)."""
        return now < self.ejected_until

    @property
    def has_rtt(self) -> bool:
        """Whether at least one RTT sample has been recorded."""
        return self._sampled_at is not None

    def start(self) -> None:
        """A request was sent to this endpoint."""
        self.in_flight += 1

    def finish(self, rtt: float, now: float) -> None:
        """A request completed after ``rtt`` seconds; fold the sample into the peak-EWMA estimate."""
        self.in_flight -= 1
        rtt = max(rtt, 0.0)
        if self._sampled_at is None or rtt > self._estimate:
            # First sample replaces the guess outright; a peak replaces the estimate (worst case wins at once).
            self._estimate = rtt
        else:
            elapsed = max(now - self._sampled_at, 0.0)
            keep = math.exp(-elapsed / self._decay)
            self._estimate = self._estimate * keep + rtt * (1.0 - keep)
        self._sampled_at = now

    def abandon(self) -> None:
        """A request ended without a usable RTT (cancelled, connect error): release it, record no sample.

        A fast failure must not count as a fast answer, or a broken endpoint would look like the best one.
        """
        self.in_flight -= 1

    def rtt_estimate(self, now: float) -> float:
        """The latency estimate at ``now`` in seconds, decayed toward zero for the time since the last sample."""
        if self._sampled_at is None:
            return self._default_rtt
        idle = now - self._sampled_at
        if idle <= 0.0:
            return self._estimate
        return self._estimate * math.exp(-idle / self._decay)

    def cost(self, now: float) -> float:
        """Peak-EWMA load: expected latency times queued work; lower is better. Reads, never writes."""
        if self._sampled_at is None and self.in_flight > 0:
            return PENALTY + self.in_flight
        return self.rtt_estimate(now) * (self.in_flight + 1)


def panic_mode(endpoints: Collection[Endpoint], threshold_percent: float, now: float) -> bool:
    """Whether fewer than ``threshold_percent`` % of ``endpoints`` are healthy and not ejected at ``now``.

    Envoy's panic threshold (default 50): below it the balancer should ignore health and ejection (``pick(...,
    panic=True)``). Breakers are not counted: they gate each endpoint in panic mode too. An empty set is not in
    panic (there is nothing to spread over); a threshold of 0 disables panic mode. O(n): call it once per request
    at most, or cache it per cluster for a short while.
    """
    total = len(endpoints)
    if total == 0 or threshold_percent <= 0:
        return False
    usable = sum(1 for e in endpoints if e.healthy and now >= e.ejected_until)
    return usable * 100 < threshold_percent * total
