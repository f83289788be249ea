"""DNS discovery with a scripted resolver (no sockets, except one real lookup of localhost), and reconcile."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

import pytest
from structlog.testing import capture_logs

from gateway.config.snapshot import Address, DnsDiscovery, EndpointSpec
from gateway.upstream.discovery import DnsResolver, getaddrinfo_resolve, reconcile
from gateway.upstream.state import Endpoint

SPEC = DnsDiscovery(host="orders.internal", port=8080, refresh=0.01)
A, B, C = (Address(f"10.0.0.{i}", 8080) for i in (1, 2, 3))


class ScriptedResolver:
    """Answers from a script; each entry is a list of addresses, an exception to raise, or "hang"."""

    def __init__(self, *script: list[Address] | BaseException | str) -> None:
        self.script = list(script)
        self.calls: list[tuple[str, int]] = []
        self.called = asyncio.Event()

    async def __call__(self, host: str, port: int) -> Sequence[Address]:
        self.calls.append((host, port))
        self.called.set()
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if step == "hang":
            await asyncio.Event().wait()
        if isinstance(step, BaseException):
            raise step
        assert isinstance(step, list)
        return step


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[Address, ...]] = []

    def __call__(self, addresses: tuple[Address, ...]) -> None:
        self.changes.append(addresses)


def resolver_for(*script: list[Address] | BaseException | str) -> tuple[DnsResolver, ScriptedResolver, Recorder]:
    fake, seen = ScriptedResolver(*script), Recorder()
    return DnsResolver(SPEC, seen, upstream="orders", resolve=fake, timeout=0.05), fake, seen


async def test_first_answer_is_reported_sorted_and_deduplicated() -> None:
    dns, fake, seen = resolver_for([C, A, C, B, A])
    assert dns.addresses is None
    assert await dns.refresh() is True
    assert seen.changes == [(A, B, C)]
    assert dns.addresses == (A, B, C)
    assert fake.calls == [("orders.internal", 8080)]


@pytest.mark.parametrize(
    ("script", "expected_changes"),
    [
        ([[A, B], [B, A], [A, B]], [(A, B)]),  # same set in another order: no change
        ([[A, B], [A, B, C], [C]], [(A, B), (A, B, C), (C,)]),  # growth and shrink are both reported
        ([[A], socket.gaierror(-2, "Name or service not known"), [A]], [(A,)]),  # failure keeps the last good set
        ([[A], [], [A, B]], [(A,), (A, B)]),  # an empty answer is treated like a failure
        ([[A], OSError("resolver unreachable"), [B]], [(A,), (B,)]),
        ([[A], RuntimeError("bug in a resolver"), [B]], [(A,), (B,)]),  # even unexpected errors never escape
    ],
)
async def test_changes_are_reported_only_when_the_set_changes(
    script: list[list[Address] | BaseException], expected_changes: list[tuple[Address, ...]]
) -> None:
    dns, _, seen = resolver_for(*script)
    for _ in script:
        await dns.refresh()
    assert seen.changes == expected_changes
    assert dns.addresses == expected_changes[-1]


@pytest.mark.parametrize(
    ("failure", "event"),
    [
        (socket.gaierror(-2, "Name or service not known"), "dns_resolve_failed"),
        ("hang", "dns_resolve_failed"),  # a hung getaddrinfo is cut off by the timeout
        (ValueError("boom"), "dns_resolve_error"),
    ],
)
async def test_failure_is_logged_and_keeps_the_last_good_set(failure: BaseException | str, event: str) -> None:
    dns, _, seen = resolver_for([A, B], failure)
    await dns.refresh()
    with capture_logs() as logs:
        assert await dns.refresh() is False
    assert seen.changes == [(A, B)]
    assert dns.addresses == (A, B)
    assert [(entry["event"], entry["upstream"], entry["log_level"]) for entry in logs] == [
        (event, "orders", "warning" if event == "dns_resolve_failed" else "error")
    ]


async def test_empty_answer_is_logged() -> None:
    dns, _, _ = resolver_for([])
    with capture_logs() as logs:
        assert await dns.refresh() is False
    assert [entry["event"] for entry in logs] == ["dns_resolve_empty"]
    assert dns.addresses is None


async def test_a_failing_on_change_is_offered_the_same_set_again() -> None:
    attempts: list[tuple[Address, ...]] = []

    def flaky(addresses: tuple[Address, ...]) -> None:
        attempts.append(addresses)
        if len(attempts) == 1:
            raise RuntimeError("reconcile failed")

    dns = DnsResolver(SPEC, flaky, upstream="orders", resolve=ScriptedResolver([A]))
    with capture_logs() as logs:
        await dns.refresh()
    assert dns.addresses is None
    assert logs[0]["event"] == "dns_on_change_failed"
    await dns.refresh()
    assert attempts == [(A,), (A,)]
    assert dns.addresses == (A,)


async def test_start_resolves_now_and_then_every_refresh_until_stopped() -> None:
    dns, fake, seen = resolver_for([A], [A, B], [B])
    dns.start()
    dns.start()  # idempotent: still one task
    for _ in range(200):
        if len(fake.calls) >= 4:
            break
        await asyncio.sleep(0.005)
    await dns.stop()
    assert seen.changes == [(A,), (A, B), (B,)]
    calls = len(fake.calls)
    await asyncio.sleep(0.03)
    assert len(fake.calls) == calls  # nothing runs after stop
    await dns.stop()  # a second stop is harmless


async def test_logs_name_the_host_when_no_upstream_is_given() -> None:
    dns = DnsResolver(SPEC, Recorder(), resolve=ScriptedResolver(OSError("down")))
    with capture_logs() as logs:
        await dns.refresh()
    assert logs[0]["upstream"] == "orders.internal"


async def test_stop_before_start_is_harmless() -> None:
    dns, _, _ = resolver_for([A])
    await dns.stop()


async def test_real_getaddrinfo_resolves_localhost() -> None:
    found = await getaddrinfo_resolve("localhost", 8080)
    assert found
    assert {a.port for a in found} == {8080}
    assert {a.host for a in found} & {"127.0.0.1", "::1"}


# ---- reconcile ------------------------------------------------------------------------------------------------


def test_reconcile_keeps_existing_objects_and_creates_new_ones() -> None:
    current = reconcile({}, [A, B], "orders", weight=2)
    a, b = current[str(A)], current[str(B)]
    a.start()
    a.finish(0.004, now=1.0)
    b.start()  # a request in flight on b while b is removed
    updated = reconcile(current, [C, A], "orders", weight=2)
    assert list(updated) == [str(C), str(A)]  # the given order
    assert updated[str(A)] is a
    assert a.has_rtt  # state survived
    assert updated[str(C)].address == C
    assert updated[str(C)].cluster == "orders"
    assert updated[str(C)].weight == 2
    assert str(B) not in updated
    b.finish(0.010, now=2.0)  # the removed endpoint still accepts its in-flight report
    assert b.in_flight == 0
    assert list(current) == [str(A), str(B)]  # the input mapping is untouched


def test_reconcile_takes_per_endpoint_weights_from_specs_and_updates_kept_objects() -> None:
    current = reconcile({}, [EndpointSpec(A, 1), EndpointSpec(B, 3)], "orders")
    kept = current[str(A)]
    updated = reconcile(current, [EndpointSpec(A, 5), B], "orders", weight=7)
    assert updated[str(A)] is kept
    assert kept.weight == 5
    assert updated[str(B)].weight == 7  # a bare Address takes the default weight


def test_reconcile_keeps_the_first_of_duplicates() -> None:
    result = reconcile({}, [EndpointSpec(A, 2), A, EndpointSpec(A, 9)], "orders")
    assert list(result) == [str(A)]
    assert result[str(A)].weight == 2


def test_reconcile_does_not_adopt_another_clusters_endpoint() -> None:
    foreign = Endpoint("payments", A)
    result = reconcile({str(A): foreign}, [A], "orders")
    assert result[str(A)] is not foreign
    assert result[str(A)].cluster == "orders"


def test_reconcile_rejects_a_bad_weight() -> None:
    existing = reconcile({}, [A], "orders")
    with pytest.raises(ValueError, match=r"weight must be >= 1, got 0 for 10\.0\.0\.1:8080"):
        reconcile(existing, [A], "orders", weight=0)
    assert existing[str(A)].weight == 1
