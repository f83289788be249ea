"""Passive health: Envoy-style consecutive-5xx outlier detection over one cluster's endpoints.

The forward stage reports every attempt's outcome with ``OutlierDetector.record``: failed means a 5xx response or
a gateway error (connect failure, reset, timeout), success anything else. ``consecutive_5xx`` failures in a row
eject the endpoint: ``usable`` is False until ``ejected_until``, after which it is simply back (computed from
``now``; there is no un-eject timer and nothing to sweep).

Ejection arithmetic, as in Envoy:

* the ejection lasts ``min(max_ejection_time, base_ejection_time * times_ejected)``, so an endpoint that keeps
  failing stays out longer each time;
* ``times_ejected`` decays while the endpoint behaves: for every ``base_ejection_time`` it spends back in rotation
  it drops by one (Envoy decrements it every ``interval`` of good health; there is no ``interval`` here, so the
  base time is the step). The decay is applied lazily, at the next ejection;
* at most ``max_ejection_percent`` of the cluster is ejected at once, since ejecting too much turns an outlier
  check into an outage, but one ejection is always allowed (Envoy's ``always_eject_one_host``): otherwise a
  cluster of fewer than 10 endpoints at the default 10% could never eject anything. An outlier that was refused
  keeps its count and is ejected by its next failure once there is room.

Outcomes that arrive while the endpoint is ejected belong to requests sent before; they are ignored, and the count
starts from zero when it returns. All state lives on the ``Endpoint`` (``consecutive_failures_5xx``,
``times_ejected``, ``ejected_until``), so it survives reloads; the detector holds only settings.

Pure: ``now`` is seconds on one monotonic clock.
"""

from __future__ import annotations

import math
from collections.abc import Collection

from gateway.config.snapshot import OutlierDetection
from gateway.upstream.state import Endpoint

__all__ = ["OutlierDetector"]


class OutlierDetector:
    """Consecutive-5xx ejection for one cluster. See the module docstring for the rules."""

    __slots__ = ("settings",)

    def __init__(self, settings: OutlierDetection) -> None:
        self.settings = settings

    def __repr__(self) -> str:
        return f"OutlierDetector({self.settings!r})"

    def reconfigure(self, settings: OutlierDetection) -> None:
        """Take new settings (config reload); current ejections run their course."""
        self.settings = settings

    def ejection_time(self, times_ejected: int) -> float:
        """Seconds an endpoint is ejected for on its ``times_ejected``-th ejection (1 for the first)."""
        settings = self.settings
        return min(settings.max_ejection_time, settings.base_ejection_time * times_ejected)

    def record(self, endpoint: Endpoint, failed: bool, now: float, cluster: Collection[Endpoint]) -> bool:
        """Count one attempt's outcome on ``endpoint``; True when this call ejected it.

        ``cluster`` is the cluster's current endpoint set (for the ejection cap); it is only scanned, O(n), when
        the endpoint reaches the threshold, so the common call is O(1).
        """
        if endpoint.ejected_at(now):
            return False
        if not failed:
            endpoint.consecutive_failures_5xx = 0
            return False
        endpoint.consecutive_failures_5xx += 1
        threshold = self.settings.consecutive_5xx
        if threshold <= 0 or endpoint.consecutive_failures_5xx < threshold:
            return False
        if not self._room_for_one_more(now, cluster):
            return False
        self._eject(endpoint, now)
        return True

    def _room_for_one_more(self, now: float, cluster: Collection[Endpoint]) -> bool:
        ejected = sum(1 for e in cluster if e.ejected_at(now))
        # Integer arithmetic: (ejected + 1) / total <= percent / 100 without float rounding at the boundary.
        return ejected == 0 or (ejected + 1) * 100 <= self.settings.max_ejection_percent * len(cluster)

    def _eject(self, endpoint: Endpoint, now: float) -> None:
        base = self.settings.base_ejection_time
        if endpoint.times_ejected > 0 and base > 0:
            # Lazy decay: one step per base_ejection_time spent back in rotation since the last ejection ended.
            good = max(now - endpoint.ejected_until, 0.0)
            endpoint.times_ejected = max(endpoint.times_ejected - math.floor(good / base), 0)
        endpoint.times_ejected += 1
        endpoint.ejected_until = now + self.ejection_time(endpoint.times_ejected)
        endpoint.consecutive_failures_5xx = 0
