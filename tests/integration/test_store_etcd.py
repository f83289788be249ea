"""The etcd config store against a real ``etcd`` process: two ``EtcdStore`` objects on one etcd stand for two
config-service replicas behind one address. Nothing is mocked.

One etcd serves the module (each test writes under its own key prefix); the tests that stop etcd start their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from gateway.configservice.etcd_kv import EtcdKV
from gateway.configservice.store import BundleRecord, GatewayReport
from gateway.configservice.store_etcd import EtcdStore, EtcdUnavailable
from tests.etcd_proc import EtcdServer, etcd_server
from tests.procs import eventually, free_port

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None or shutil.which("etcdctl") is None,
    reason="needs the Debian etcd-server and etcd-client packages (scripts/setup installs them)",
)


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with etcd_server() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"/meshgate-test-{uuid.uuid4().hex[:8]}/"


@pytest.fixture
async def stores(etcd: EtcdServer, prefix: str) -> AsyncIterator[tuple[EtcdStore, EtcdStore]]:
    """Two replicas on one etcd."""
    a = await EtcdStore.connect([etcd.endpoint], prefix)
    b = await EtcdStore.connect([etcd.endpoint], prefix)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def bundle(name: str, data: bytes, author: str = "ops") -> BundleRecord:
    return BundleRecord(name, data, hashlib.sha256(data).hexdigest(), f"rev-{len(data)}", author, time.time())


async def test_versions_and_unchanged_pushes(stores: tuple[EtcdStore, EtcdStore]) -> None:
    a, b = stores
    assert await a.latest("orders") is None
    assert await a.versions("orders") == []

    first, created = await a.put_config("orders", {"routes": [1]}, "h1", "ops")
    assert (first.version, first.hash, first.author, first.rollback_of, created) == (1, "h1", "ops", None, True)
    again, created = await b.put_config("orders", {"routes": [1]}, "h1", "someone")  # same hash, other replica
    assert (again, created) == (first, False)

    second, created = await b.put_config("orders", {"routes": [2]}, "h2", "ops")
    assert (second.version, created) == (2, True)
    back, created = await a.put_config("orders", {"routes": [1]}, "h1", "ops", rollback_of=1)
    assert (back.version, back.rollback_of, created) == (3, 1, True)

    latest = await b.latest("orders")
    assert latest is not None
    assert (latest.info, dict(latest.document)) == (back, {"routes": [1]})
    old = await a.get_version("orders", 2)
    assert old is not None
    assert dict(old.document) == {"routes": [2]}
    assert await a.get_version("orders", 9) is None
    assert [v.version for v in await b.versions("orders")] == [1, 2, 3]
    assert await a.latest("payments") is None  # services are separate


async def test_two_replicas_never_hand_out_the_same_version(stores: tuple[EtcdStore, EtcdStore]) -> None:
    a, b = stores
    puts = [
        store.put_config("orders", {"n": i}, f"hash-{i}", "ops") for i, store in enumerate([a, b] * 15)
    ]  # 30 concurrent pushes with different content, half through each replica
    results = await asyncio.gather(*puts)
    numbers = sorted(info.version for info, created in results if created)
    assert numbers == list(range(1, 31))
    stored = {v.version: v.hash for v in await a.versions("orders")}
    assert stored == {info.version: info.hash for info, _ in results}


async def test_a_write_on_one_replica_wakes_a_waiter_on_the_other(stores: tuple[EtcdStore, EtcdStore]) -> None:
    a, b = stores
    await a.put_config("orders", {"v": 1}, "h1", "ops")
    assert (await b.wait_newer("orders", 0, 5)) is not None  # newer already: answers at once

    started = time.monotonic()
    assert await b.wait_newer("orders", 1, 0.3) is None  # nothing newer: the wait runs out
    assert 0.25 < time.monotonic() - started < 1.5

    latencies = []
    for n in range(2, 7):
        waiter = asyncio.create_task(b.wait_newer("orders", n - 1, 10))
        await asyncio.sleep(0.05)  # parked
        assert not waiter.done()
        put_at = time.monotonic()
        await a.put_config("orders", {"v": n}, f"h{n}", "ops")
        found = await waiter
        latencies.append(time.monotonic() - put_at)
        assert found is not None
        assert (found.info.version, dict(found.document)) == (n, {"v": n})
    assert max(latencies) < 0.25, latencies  # measured ~4 ms, the put's own round trip included


async def test_a_latest_pointer_moved_back_is_not_answered_from_memory(
    stores: tuple[EtcdStore, EtcdStore], etcd: EtcdServer, prefix: str
) -> None:
    a, b = stores
    for n in (1, 2, 3):
        await a.put_config("orders", {"v": n}, f"h{n}", "ops")
    found = await b.wait_newer("orders", 2, 5)  # b keeps version 3 in memory from its watch
    assert found is not None
    assert found.info.version == 3
    # A restore from a backup taken at version 2: version 3 is gone, the pointer says 2.
    kv = EtcdKV([etcd.endpoint])
    try:
        await kv.delete(f"{prefix}services/orders/versions/{3:012d}".encode())
        await kv.put(f"{prefix}services/orders/latest".encode(), b"2")
    finally:
        await kv.close()

    async def nothing_newer() -> bool:
        return await b.wait_newer("orders", 2, 0.05) is None  # not the vanished version 3

    await eventually(nothing_newer, 5.0, "version 3 forgotten by the replica that kept it")
    latest = await b.latest("orders")
    assert latest is not None
    assert latest.info.version == 2


async def test_instances_join_heartbeat_leave_across_replicas(stores: tuple[EtcdStore, EtcdStore]) -> None:
    a, b = stores
    empty = await b.instances("orders")
    assert (empty.version, list(empty.instances)) == (0, [])

    waiter = asyncio.create_task(b.wait_instances("orders", 0, 10))
    await asyncio.sleep(0.05)
    joined = await a.put_instance("orders", "i-1", "10.0.0.1:8080", 30)
    listed = await asyncio.wait_for(waiter, 1)
    assert listed is not None
    assert [(i.id, i.address) for i in listed.instances] == [("i-1", "10.0.0.1:8080")]
    assert listed.instances[0].expires_at == pytest.approx(joined.expires_at)

    # A heartbeat moves expires_at but is not a change of the list: watchers sleep on.
    heartbeat = asyncio.create_task(b.wait_instances("orders", listed.version, 0.5))
    await asyncio.sleep(0.05)
    refreshed = await a.put_instance("orders", "i-1", "10.0.0.1:8080", 60)
    assert await heartbeat is None
    after = await b.instances("orders")
    assert after.version == listed.version
    assert after.instances[0].expires_at == pytest.approx(refreshed.expires_at)

    moved = await b.put_instance("orders", "i-1", "10.0.0.2:8080", 60)  # a new address is a change
    assert moved.address == "10.0.0.2:8080"
    assert (await a.instances("orders")).version > listed.version

    await b.put_instance("orders", "i-2", "10.0.0.3:8080", 60)
    before = await a.instances("orders")
    assert sorted(i.id for i in before.instances) == ["i-1", "i-2"]
    assert await a.delete_instance("orders", "i-1") is True
    assert await a.delete_instance("orders", "i-1") is False
    assert await a.delete_instance("orders", "never") is False
    left = await b.instances("orders")
    assert left.version > before.version
    assert [i.id for i in left.instances] == ["i-2"]


async def test_an_expired_lease_wakes_a_waiter_on_the_other_replica(stores: tuple[EtcdStore, EtcdStore]) -> None:
    a, b = stores
    await a.put_instance("orders", "stays", "10.0.0.1:1", 60)
    await a.put_instance("orders", "dies", "10.0.0.2:1", 1)  # etcd grants 2 s at least (default Raft timings)
    current = await b.instances("orders")
    assert sorted(i.id for i in current.instances) == ["dies", "stays"]

    started = time.monotonic()
    expired = await b.wait_instances("orders", current.version, 6)
    waited = time.monotonic() - started
    assert expired is not None
    assert [i.id for i in expired.instances] == ["stays"]
    assert 0.8 < waited < 3.5, waited  # etcd deletes it between 2 and 2.5 s after the grant
    assert (await a.instances("orders")).version == expired.version  # every replica computes the same version


async def test_an_expiry_nobody_watched_is_caught_up_at_connect(etcd: EtcdServer, prefix: str) -> None:
    a = await EtcdStore.connect([etcd.endpoint], prefix)
    await a.put_instance("orders", "dies", "10.0.0.2:1", 1)
    before = await a.instances("orders")
    await a.close()  # every replica down while the lease runs out
    await asyncio.sleep(2.7)
    b = await EtcdStore.connect([etcd.endpoint], prefix)
    try:
        after = await b.instances("orders")
        assert list(after.instances) == []
        assert after.version > before.version  # a gateway holding the old ETag gets the empty list
    finally:
        await b.close()


async def test_gateway_reports_are_visible_from_the_other_replica(stores: tuple[EtcdStore, EtcdStore]) -> None:
    a, b = stores
    now = time.time()
    await a.report_gateway(GatewayReport("orders", "gw-1", 3, 0, "", now))
    await b.report_gateway(GatewayReport("payments", "gw-2", 1, 2, "routes[0]: unknown cluster", now))
    reports = await b.gateways()
    assert [(r.service, r.id, r.applied_version, r.rejected_version, r.error) for r in reports] == [
        ("orders", "gw-1", 3, 0, ""),
        ("payments", "gw-2", 1, 2, "routes[0]: unknown cluster"),
    ]
    await a.report_gateway(GatewayReport("orders", "gw-1", 4, 0, "", now + 1))  # a change is written at once
    assert [r.applied_version for r in await b.gateways()] == [4, 1]


async def test_bundles_small_and_larger_than_one_etcd_request(
    stores: tuple[EtcdStore, EtcdStore], etcd: EtcdServer, prefix: str
) -> None:
    a, b = stores
    assert await b.get_bundle("authz") is None
    small = bundle("authz", b"\x1f\x8b small bundle")
    await a.put_bundle(small)
    assert await b.get_bundle("authz") == small

    big = bundle("authz", bytes(range(256)) * (3 * 4096 + 7), author="other")  # ~3 MiB: over etcd's 1.5 MiB
    await b.put_bundle(big)
    fresh = await EtcdStore.connect([etcd.endpoint], prefix)  # no cache: reads the chunks
    try:
        assert await fresh.get_bundle("authz") == big
    finally:
        await fresh.close()
    assert await a.get_bundle("authz") == big  # the other replica's cached copy is not served: the etag moved

    kv = EtcdKV([etcd.endpoint])
    try:
        chunks = await kv.get_prefix(f"{prefix}bundle-chunks/authz/".encode())
    finally:
        await kv.close()
    assert {c.key.decode().split("/")[-2] for c in chunks} == {big.etag}  # the replaced bundle's chunks are gone
    assert len(chunks) == 4  # 1 MiB each


async def test_a_config_over_the_etcd_request_limit_is_refused_clearly(stores: tuple[EtcdStore, EtcdStore]) -> None:
    a, _ = stores
    with pytest.raises(ValueError, match=r"config too large for the etcd store \(\d+ bytes encoded; limit 1556480"):
        await a.put_config("orders", {"blob": "x" * 1_600_000}, "huge", "ops")
    assert await a.latest("orders") is None


async def test_a_new_store_object_sees_the_stored_data(etcd: EtcdServer, prefix: str) -> None:
    a = await EtcdStore.connect([etcd.endpoint], prefix)
    await a.put_config("orders", {"v": 1}, "h1", "ops")
    await a.put_instance("orders", "i-1", "10.0.0.1:1", 60)
    await a.put_bundle(bundle("authz", b"data"))
    await a.close()
    b = await EtcdStore.connect([etcd.endpoint], prefix)
    try:
        latest = await b.latest("orders")
        assert latest is not None
        assert latest.info.version == 1
        assert [i.id for i in (await b.instances("orders")).instances] == ["i-1"]
        found = await b.get_bundle("authz")
        assert found is not None
        assert found.data == b"data"
        assert (await b.put_config("orders", {"v": 2}, "h2", "ops"))[0].version == 2
    finally:
        await b.close()


async def test_unreachable_etcd_raises_a_clear_error() -> None:
    started = time.monotonic()
    with pytest.raises(EtcdUnavailable, match="etcd unavailable") as raised:
        await EtcdStore.connect([f"127.0.0.1:{free_port()}"], request_timeout=2)
    assert isinstance(raised.value, ConnectionError)  # what the API maps to 503
    assert time.monotonic() - started < 3


async def test_the_watch_survives_an_etcd_restart() -> None:
    with etcd_server() as etcd:
        a = await EtcdStore.connect([etcd.endpoint], request_timeout=2)
        b = await EtcdStore.connect([etcd.endpoint], request_timeout=2)
        try:
            await a.put_config("orders", {"v": 1}, "h1", "ops")
            etcd.stop()
            with pytest.raises(EtcdUnavailable):
                await a.put_config("orders", {"v": 2}, "h2", "ops")
            etcd.start()
            waiter = asyncio.create_task(b.wait_newer("orders", 1, 15))
            await asyncio.sleep(0.05)

            async def put() -> bool:
                try:
                    await a.put_config("orders", {"v": 2}, "h2", "ops")
                except EtcdUnavailable:
                    return False  # gRPC is between reconnection attempts (0.1 s growing to 2 s)
                return True

            await eventually(put, 5, "a write once etcd is back")
            found = await asyncio.wait_for(waiter, 10)  # b's watch re-opened (backoff) and resumed
            assert found is not None
            assert found.info.version == 2
        finally:
            await a.close()
            await b.close()


def etcdctl(etcd: EtcdServer, *args: str) -> str:
    return subprocess.run(
        ["etcdctl", "--endpoints", etcd.endpoint, *args], check=True, capture_output=True, text=True, timeout=10
    ).stdout


async def test_a_watch_resumed_past_compacted_history_resyncs() -> None:
    with etcd_server() as etcd:
        b = await EtcdStore.connect([etcd.endpoint], request_timeout=2)
        try:
            before = await b.instances("orders")
            waiter = asyncio.create_task(b.wait_instances("orders", before.version, 20))
            # A registration that bypassed every roster (as if it joined while the roster write was lost), then
            # writes outside the watched range and a compaction: b's watch cannot replay from where it stood.
            etcdctl(etcd, "put", "/meshgate/instances/orders/ghost", '{"address": "10.0.0.9:1", "expires_at": 1e12}')
            for n in range(3):
                etcdctl(etcd, "put", f"/meshgate/gateways/x/{n}", "{}")
            revision = int(
                json.loads(etcdctl(etcd, "endpoint", "status", "-w", "json"))[0]["Status"]["header"]["revision"]
            )
            etcdctl(etcd, "compaction", str(revision))
            etcd.stop()
            etcd.start()
            found = await asyncio.wait_for(waiter, 15)  # resync: roster reconciled with the live keys, waiters woken
            assert found is not None
            assert [i.id for i in found.instances] == ["ghost"]
        finally:
            await b.close()


async def test_close_answers_parked_waiters(stores: tuple[EtcdStore, EtcdStore]) -> None:
    a, _ = stores
    waiter = asyncio.create_task(a.wait_newer("orders", 0, 30))
    await asyncio.sleep(0.05)
    await a.close()
    assert await asyncio.wait_for(waiter, 1) is None
