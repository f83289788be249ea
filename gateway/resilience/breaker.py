"""Circuit breaking: a per-endpoint consecutive-failure breaker and the cluster-level admission thresholds.

``Breaker`` is Linkerd's failure accrual with exponential backoff, per endpoint::

    closed --(consecutive_failures failures in a row)--> tripped --(its duration passes)--> probing
    probing --(the probe succeeds)--> closed          probing --(the probe fails)--> tripped (duration doubled)

* closed: every request is admitted; a success resets the failure count.
* tripped: nothing is admitted, so the endpoint gets time to recover instead of more load.
* probing: exactly one request (the probe) is admitted at a time; its outcome decides.

The trip duration is ``min(max_open_for, open_for * 2**(trips - 1))`` times a jitter factor drawn uniformly from
[0.9, 1.1], where ``trips`` counts trips since the breaker was last closed. The jitter is applied after the cap, so
a duration can exceed ``max_open_for`` by up to 10%; it keeps the gateways that tripped on the same outage from
all probing the endpoint in the same instant. "tripped -> probing" is computed from ``now`` against the stored
deadline, never scheduled, so the breaker needs no timers and a tripped endpoint costs nothing while idle.

Outcomes reported while tripped are ignored: they belong to requests admitted before the trip and say nothing new.
A probe that ends without a verdict (client went away) must be released with ``on_abandon``; as a safety net a
probe unanswered for ``settings.open_for`` seconds no longer blocks the next one, so a lost report can never keep
an endpoint out of rotation for good.

``Admission`` is Envoy's cluster circuit breaker: a hard cap on concurrent requests and on requests queued for a
pooled connection; beyond either the request is refused at once (503) instead of queueing without bound.

Pure: ``now`` is seconds on one monotonic clock; randomness comes from the injected ``random.Random``.
"""

from __future__ import annotations

import random
from typing import Final, Literal

from gateway.config.snapshot import CircuitBreaker

__all__ = ["BREAKER_STATES", "STATE_VALUES", "Admission", "AdmissionRefusal", "Breaker", "BreakerState"]

BreakerState = Literal["closed", "tripped", "probing"]
BREAKER_STATES: tuple[BreakerState, ...] = ("closed", "tripped", "probing")
# The gauge value exported per state (the admin API shows the names, dashboards map the numbers back).
STATE_VALUES: Final[dict[BreakerState, int]] = {"closed": 0, "tripped": 1, "probing": 2}

AdmissionRefusal = Literal["max_requests", "max_pending"]

_JITTER_LOW = 0.9
_JITTER_HIGH = 1.1
_MAX_DOUBLINGS = 64  # 2**64 x any open_for is past any max_open_for; bounds the float power


class Breaker:
    """One endpoint's consecutive-failure breaker. See the module docstring for the state machine.

    ``admits`` only reads (the balancer calls it on candidates it may not choose); ``on_attempt`` is the one call
    that claims the probe, made once the endpoint was actually chosen. Every ``on_attempt`` is followed by exactly
    one ``record_success``, ``record_failure`` or ``on_abandon``.
    """

    __slots__ = ("_probe_started", "_tripped", "_until", "failures", "settings", "trips")

    def __init__(self, settings: CircuitBreaker) -> None:
        self.settings = settings
        self.failures = 0  # consecutive failures while closed
        self.trips = 0  # trips since last closed; sets the next trip's duration
        self._tripped = False  # False = closed; True = tripped or probing, told apart by ``_until``
        self._until = 0.0  # end of the current trip
        self._probe_started: float | None = None  # when the in-flight probe was sent; None = no probe in flight

    def __repr__(self) -> str:
        return f"Breaker(failures={self.failures}, trips={self.trips}, tripped_until={self._until})"

    @property
    def tripped_until(self) -> float:
        """End of the current or last trip (0.0 if never tripped); meaningful only while not closed."""
        return self._until

    def reconfigure(self, settings: CircuitBreaker) -> None:
        """Take new settings (config reload) keeping the state; they apply from the next transition on."""
        self.settings = settings

    def state_at(self, now: float) -> BreakerState:
        """The state at ``now``: "closed", "tripped" or "probing" (tripped turns into probing as time passes)."""
        if not self._tripped:
            return "closed"
        return "tripped" if now < self._until else "probing"

    def _probe_busy(self, now: float) -> bool:
        started = self._probe_started
        return started is not None and now - started < self.settings.open_for

    def admits(self, now: float) -> bool:
        """Whether a request may go to this endpoint at ``now``. Reads only: the hot path calls it per candidate."""
        if not self._tripped:
            return True
        if now < self._until:
            return False
        return not self._probe_busy(now)

    def on_attempt(self, now: float) -> None:
        """A request is being sent to this endpoint; in probing state it becomes the probe."""
        if self._tripped and now >= self._until:
            self._probe_started = now

    def on_abandon(self, now: float) -> None:
        """An attempt ended without a verdict (cancelled): free the probe slot so another probe may go.

        The breaker cannot tell the probe from a request sent before the trip, so abandoning the latter also frees
        the slot: at worst one extra probe, never a stuck endpoint.
        """
        self._probe_started = None

    def record_success(self, now: float) -> None:
        """An attempt succeeded. Closed: resets the failure count. Probing: closes the breaker."""
        if not self._tripped:
            self.failures = 0
        elif now >= self._until:
            self._tripped = False
            self.failures = 0
            self.trips = 0
            self._probe_started = None

    def record_failure(self, now: float, rng: random.Random) -> None:
        """An attempt failed. Closed: counts toward the threshold (0 = never trips). Probing: trips again, longer."""
        if not self._tripped:
            self.failures += 1
            threshold = self.settings.consecutive_failures
            if threshold > 0 and self.failures >= threshold:
                self._trip(now, rng)
        elif now >= self._until:
            self._trip(now, rng)

    def _trip(self, now: float, rng: random.Random) -> None:
        settings = self.settings
        self.trips += 1
        base = min(settings.max_open_for, settings.open_for * 2.0 ** min(self.trips - 1, _MAX_DOUBLINGS))
        self._until = now + base * rng.uniform(_JITTER_LOW, _JITTER_HIGH)
        self._tripped = True
        self.failures = 0
        self._probe_started = None


class Admission:
    """A cluster's concurrency thresholds: at most ``max_requests`` active and ``max_pending`` waiting.

    "Pending" is the requests beyond the pool's connection count: with ``pool_size`` connections, that many
    requests can be on the wire and the rest wait for a connection. Pair every admitted ``try_enter`` with one
    ``leave``.
    """

    __slots__ = ("active", "settings")

    def __init__(self, settings: CircuitBreaker) -> None:
        self.settings = settings
        self.active = 0

    def __repr__(self) -> str:
        return f"Admission(active={self.active})"

    def reconfigure(self, settings: CircuitBreaker) -> None:
        """Take new thresholds (config reload); requests already admitted stay counted."""
        self.settings = settings

    def pending(self, pool_size: int) -> int:
        """Active requests beyond ``pool_size`` connections, i.e. waiting for one."""
        return max(self.active - pool_size, 0)

    def try_enter(self, pool_size: int) -> AdmissionRefusal | None:
        """Admit one request (None) or name the threshold it would cross; a refused request is not counted."""
        if self.active >= self.settings.max_requests:
            return "max_requests"
        if self.active + 1 - pool_size > self.settings.max_pending:
            return "max_pending"
        self.active += 1
        return None

    def leave(self) -> None:
        """An admitted request finished."""
        # Clamped rather than raised: this runs in ``finally`` blocks, where raising would mask the real error.
        if self.active > 0:
            self.active -= 1
