"""When to renew the mesh certificate, and the loop that does it.

A certificate is renewed at half its lifetime, give or take ``JITTER`` of it (so a fleet started together does not
renew together), as Linkerd and Istio do. A renewal that fails is retried with exponential backoff and full jitter,
and the current certificate keeps serving until it actually expires: a config service that is down for a while
costs nothing as long as it is back before then. Without any certificate (the service was down at start-up) the
loop keeps asking, with the same backoff.

``renew_at`` and ``retry_delay`` are pure; ``Renewal`` takes its clock, sleep and randomness as arguments.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import structlog

from gateway.mesh.identity import IdentityError, MeshCertificate
from gateway.resilience.backoff import full_jitter

__all__ = ["JITTER", "MIN_RENEW_GAP", "RETRY_BASE", "RETRY_CAP", "Renewal", "renew_at", "retry_delay"]

log = structlog.get_logger("meshgate.mesh")

JITTER = 0.05  # of the lifetime, either side of the half-life
RETRY_BASE = 0.5  # seconds: the first retry waits up to this
RETRY_CAP = 30.0  # ... doubling up to this
_MIN_DELAY = 0.05
# Never renew sooner than this after the last success: a CA that backdates its certificates far (or a clock that is
# far off) would otherwise put the half-life in the past and turn renewal into a busy loop.
MIN_RENEW_GAP = 1.0


def renew_at(cert: MeshCertificate, rng: random.Random, received: float = 0.0) -> float:
    """The wall-clock time (epoch seconds) to renew ``cert``: its half-life, +/- ``JITTER`` of its lifetime.

    The life counts from when the certificate was ``received`` if that is later than ``not_before``: a CA that
    backdates its certificates (for clock skew; the config service backdates 5 minutes) would otherwise put the
    half-life of a short-lived certificate at, or before, the moment it is issued."""
    start = max(cert.not_before, received)
    return start + (cert.not_after - start) * (0.5 + rng.uniform(-JITTER, JITTER))


def retry_delay(failures: int, cert: MeshCertificate | None, now: float, rng: random.Random) -> float:
    """Seconds before the next attempt after ``failures`` (>= 1) failed ones in a row. Never past a quarter of what
    is left of ``cert``'s validity, so several attempts still fit before it expires."""
    delay = full_jitter(failures - 1, RETRY_BASE, RETRY_CAP, rng)
    if cert is not None and cert.not_after > now:
        delay = min(delay, (cert.not_after - now) / 4)
    return max(delay, _MIN_DELAY)


class Renewal:
    """Keeps a current certificate: ``obtain`` asks the config service for one, ``install`` puts it to use."""

    def __init__(
        self,
        obtain: Callable[[], Awaitable[MeshCertificate]],
        install: Callable[[MeshCertificate], None],
        rng: random.Random,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._obtain = obtain
        self._install = install
        self._rng = rng
        self._clock = clock
        self._sleep = sleep
        self.failures = 0  # attempts failed in a row
        self._received = 0.0  # when the current certificate was installed (clock time)

    def next_delay(self, current: MeshCertificate | None) -> float:
        """Seconds from now to the next attempt."""
        now = self._clock()
        if self.failures:
            return retry_delay(self.failures, current, now, self._rng)
        if current is None:
            return 0.0
        return max(renew_at(current, self._rng, self._received) - now, MIN_RENEW_GAP)

    async def run(self, current: MeshCertificate | None) -> None:
        """Forever: wait for the next renewal, get a certificate, install it. Cancel to stop."""
        expired_logged = False
        while True:
            await self._sleep(self.next_delay(current))
            try:
                fresh = await self._obtain()
                self._install(fresh)
            except Exception as error:  # whatever failed, this task must live: it is the only renewer
                # Not just IdentityError: a bundle OpenSSL refuses (ssl.SSLError from install), an answer the
                # parser did not foresee ... would otherwise end the task silently and let the certificate expire.
                reason = str(error) if isinstance(error, IdentityError) else f"{type(error).__name__}: {error}"
                self.failures += 1
                now = self._clock()
                expired = current is not None and now >= current.not_after
                fields = {
                    "error": reason,
                    "failures": self.failures,
                    "serving_serial": current.serial if current is not None else None,
                    "expires_in_s": round(current.not_after - now, 1) if current is not None else None,
                }
                if expired and not expired_logged:
                    # From now on handshakes with peers fail: the loudest line this module writes.
                    log.error("mesh_certificate_expired", **fields)
                    expired_logged = True
                else:
                    log.warning("mesh_certificate_renewal_failed", **fields)
                continue
            self.failures = 0
            expired_logged = False
            self._received = self._clock()
            current = fresh
