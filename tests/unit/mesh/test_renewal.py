"""Renewal timing (half-life with jitter, backoff that keeps the certificate until it expires), with an injected
clock and sleep: no real time passes."""

from __future__ import annotations

import asyncio
import random
import ssl

import pytest

from gateway.mesh.identity import IdentityError, MeshCertificate
from gateway.mesh.renewal import JITTER, MIN_RENEW_GAP, RETRY_CAP, Renewal, renew_at, retry_delay


def cert(not_before: float, lifetime: float, serial: str = "1") -> MeshCertificate:
    return MeshCertificate(
        b"", b"", b"", "spiffe://meshgate.local/service/orders", serial, not_before, not_before + lifetime
    )


def test_renews_at_half_life_within_the_jitter() -> None:
    rng = random.Random(7)
    times = [renew_at(cert(1000.0, 86400.0), rng) for _ in range(500)]
    assert min(times) >= 1000 + 86400 * (0.5 - JITTER)
    assert max(times) <= 1000 + 86400 * (0.5 + JITTER)
    assert max(times) - min(times) > 86400 * JITTER  # actually spread, not one instant for the whole fleet


def test_a_backdated_certificate_counts_its_life_from_when_it_arrived() -> None:
    # The config service backdates 5 minutes: a 5-minute certificate received at t=300 is valid from 0 to 600.
    backdated = cert(0.0, 600.0)
    assert 300 + 300 * (0.5 - JITTER) <= renew_at(backdated, random.Random(1), received=300.0) <= 300 + 300 * 0.55


def test_retry_backs_off_and_never_waits_past_a_quarter_of_what_is_left() -> None:
    rng = random.Random(1)
    current = cert(0.0, 100.0)
    assert all(retry_delay(1, current, 50.0, rng) <= 0.5 for _ in range(100))
    assert max(retry_delay(10, None, 0.0, rng) for _ in range(200)) > RETRY_CAP / 2
    assert all(retry_delay(10, current, 96.0, rng) <= 1.0 for _ in range(100))  # 4 s left: several tries fit
    assert all(retry_delay(10, current, 200.0, rng) <= RETRY_CAP for _ in range(100))  # expired: keep asking


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


async def test_loop_renews_keeps_the_old_certificate_on_failure_and_stops_backing_off_on_success() -> None:
    clock = Clock()
    outcomes: list[object] = [cert(1000.0, 100.0, "A"), IdentityError("down"), IdentityError("down"), None]
    installed: list[str] = []

    async def obtain() -> MeshCertificate:
        if not outcomes:
            raise asyncio.CancelledError  # the fake ran out of outcomes: stop the loop as a cancel would
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        if outcome is None:
            outcome = cert(clock.now, 100.0, "B")
        assert isinstance(outcome, MeshCertificate)
        return outcome

    renewal = Renewal(obtain, lambda c: installed.append(c.serial), random.Random(3), clock, clock.sleep)
    with pytest.raises(asyncio.CancelledError):
        await renewal.run(None)
    assert installed == ["A", "B"]
    assert clock.sleeps[0] == 0.0  # no certificate yet: ask at once
    assert 45 <= clock.sleeps[1] <= 55  # then at A's half-life
    assert all(s <= 0.5 for s in clock.sleeps[2:4])  # two quick retries while A is still valid
    assert 45 <= clock.sleeps[4] <= 55  # B's half-life: the backoff was reset by the success
    assert renewal.failures == 0


async def test_an_unexpected_failure_is_a_failed_renewal_never_the_end_of_the_loop() -> None:
    # Bug fix: only IdentityError was caught, so a bundle OpenSSL refused at install (ssl.SSLError) or any error the
    # answer's parser did not foresee ended the renewal task silently, and the certificate expired later.
    clock = Clock()
    outcomes: list[object] = [cert(1000.0, 100.0, "A"), ValueError("odd answer"), cert(1000.0, 100.0, "B"), None]
    installed: list[str] = []

    async def obtain() -> MeshCertificate:
        outcome = outcomes.pop(0) if outcomes else None
        if outcome is None:
            raise asyncio.CancelledError
        if isinstance(outcome, Exception):
            raise outcome
        assert isinstance(outcome, MeshCertificate)
        return outcome

    def install(c: MeshCertificate) -> None:
        if c.serial == "B":
            raise ssl.SSLError("bad bundle")
        installed.append(c.serial)

    renewal = Renewal(obtain, install, random.Random(3), clock, clock.sleep)
    with pytest.raises(asyncio.CancelledError):
        await renewal.run(None)
    assert installed == ["A"]
    assert renewal.failures == 2  # the odd answer and the refused install: both retried with backoff
    assert all(s <= 0.5 for s in clock.sleeps[2:4])


def test_next_delay_is_never_a_busy_loop() -> None:
    clock = Clock()

    async def obtain() -> MeshCertificate:
        raise AssertionError

    renewal = Renewal(obtain, lambda c: None, random.Random(0), clock, clock.sleep)
    # Backdated far: the half-life is already past when the certificate arrives.
    assert renewal.next_delay(cert(clock.now - 1000, 1100)) == MIN_RENEW_GAP
