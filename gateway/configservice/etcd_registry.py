"""The etcd store's instance registry: instances on etcd leases, and a roster whose revision is the list's version.

Keys, under the store's prefix:

``instances/{s}/{id}``  JSON ``{address, expires_at, ttl}``, attached to an etcd lease of the TTL
``rosters/{s}``         JSON ``{"ids": [...]}``: the live instance ids; its ``mod_revision`` is the list's ``version``

Why a roster: an expired lease deletes its key and leaves no trace, so the newest ``mod_revision`` under
``instances/{s}/`` cannot be the version (it would go *down* when the newest instance expires, and a heartbeat
would move it). So:

* a **join** (or an address change) writes the instance and the roster in one transaction, guarded by both keys'
  ``mod_revision``; a **delete** removes the key and rewrites the roster the same way;
* a **heartbeat** of an unchanged instance rewrites only its key, on a fresh lease (the old one is then revoked, as
  the key has left it): the list's version does not move and the fleet's registry watchers sleep on;
* an **expiry** is seen by every replica's watch as a deletion; each then reconciles the roster with the live keys,
  a compare-and-swap on the roster, so exactly one write lands and the version grows once. At connect, and when
  the watch lost history to a compaction, every roster is reconciled: expiries nobody watched are caught up.

The roster's ``mod_revision`` is one etcd revision, the same on every replica, so a gateway may poll any replica
with its ETag. etcd leases are whole seconds and never shorter than its minimum (1.5 x the election timeout rounded
up: 2 s with default Raft timings), and etcd revokes expired leases every 500 ms: the listing hides an instance at
exactly ``expires_at``, but the deletion, and so the version bump that wakes watchers, may come up to ~1.5 s later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Sequence

import structlog

from gateway.configservice import etcd_kv
from gateway.configservice.etcd_kv import KV, EtcdKV
from gateway.configservice.store import Instance, InstanceList

__all__ = ["EtcdRegistry"]

_log = structlog.get_logger("meshgate.configservice")


def _ids(kvs: Sequence[KV]) -> set[str]:
    return set(json.loads(kvs[0].value)["ids"]) if kvs else set()


def _roster(ids: set[str]) -> bytes:
    return json.dumps({"ids": sorted(ids)}, separators=(",", ":")).encode()


def _mod(kvs: Sequence[KV]) -> int:
    return kvs[0].mod_revision if kvs else 0  # 0: absent, which is how etcd compares a missing key


class EtcdRegistry:
    """Instances of every service under ``prefix`` (bytes, ending in ``/``). Names are checked by the caller."""

    def __init__(self, kv: EtcdKV, prefix: bytes) -> None:
        self._kv = kv
        self._instances = prefix + b"instances/"
        self._rosters = prefix + b"rosters/"
        self._dirty: set[str] = set()
        self._reconcilers: dict[str, asyncio.Task[None]] = {}

    def _key(self, service: str, instance_id: str = "") -> bytes:
        return self._instances + f"{service}/{instance_id}".encode()

    def _roster_key(self, service: str) -> bytes:
        return self._rosters + service.encode()

    async def put(self, service: str, instance_id: str, address: str, ttl: float) -> Instance:
        """Register or refresh ``instance_id`` for ``ttl`` seconds from now."""
        key, roster_key = self._key(service, instance_id), self._roster_key(service)
        lease, _ = await self._kv.grant(max(1, math.ceil(ttl)))
        expires_at = time.time() + ttl
        value = json.dumps({"address": address, "expires_at": expires_at, "ttl": ttl}).encode()
        try:
            while True:
                _, (roster, existing) = await self._kv.txn([], [etcd_kv.get(roster_key), etcd_kv.get(key)])
                old = existing[0] if existing else None
                if old is not None and json.loads(old.value)["address"] == address:
                    # A heartbeat: same member, new lease; the roster (the list's version) stays as it is.
                    succeeded, _ = await self._kv.txn(
                        [etcd_kv.mod_is(key, old.mod_revision)], [etcd_kv.put(key, value, lease)]
                    )
                else:
                    # A join or a new address: the roster changes with the key, in one transaction.
                    succeeded, _ = await self._kv.txn(
                        [etcd_kv.mod_is(roster_key, _mod(roster)), etcd_kv.mod_is(key, _mod(existing))],
                        [
                            etcd_kv.put(key, value, lease),
                            etcd_kv.put(roster_key, _roster(_ids(roster) | {instance_id})),
                        ],
                    )
                if succeeded:
                    break
        except BaseException:
            with contextlib.suppress(Exception):
                await self._kv.revoke(lease)  # not attached to anything: do not leave it to run out
            raise
        if old is not None and old.lease:
            with contextlib.suppress(Exception):  # the key has left it; an unrevoked lease just runs out
                await self._kv.revoke(old.lease)
        return Instance(instance_id, address, expires_at)

    async def delete(self, service: str, instance_id: str) -> bool:
        """Remove a live instance; False when there is none."""
        key, roster_key = self._key(service, instance_id), self._roster_key(service)
        while True:
            _, (roster, existing) = await self._kv.txn([], [etcd_kv.get(roster_key), etcd_kv.get(key)])
            if not existing:
                return False
            succeeded, _ = await self._kv.txn(
                [etcd_kv.mod_is(roster_key, _mod(roster)), etcd_kv.mod_is(key, _mod(existing))],
                [etcd_kv.delete(key), etcd_kv.put(roster_key, _roster(_ids(roster) - {instance_id}))],
            )
            if succeeded:
                with contextlib.suppress(Exception):
                    await self._kv.revoke(existing[0].lease)
                return True

    async def listing(self, service: str) -> InstanceList:
        """The live instances, sorted by id, and the list's version, from one consistent read."""
        prefix = self._key(service)
        _, (roster, kvs) = await self._kv.txn([], [etcd_kv.get(self._roster_key(service)), etcd_kv.get_prefix(prefix)])
        now = time.time()
        found = []
        for kv in kvs:
            raw = json.loads(kv.value)
            if float(raw["expires_at"]) > now:  # etcd may delete it later than that (see the module docstring)
                found.append(Instance(kv.key[len(prefix) :].decode(), str(raw["address"]), float(raw["expires_at"])))
        return InstanceList(_mod(roster), found)

    # --- roster reconciliation -------------------------------------------------------------------------------------
    def deleted(self, service: str) -> None:
        """The watch saw an instance key of ``service`` go: reconcile its roster in the background (an expiry; for
        a delete through ``delete`` the roster is already right and this costs one read)."""
        self._dirty.add(service)
        if service not in self._reconcilers:
            self._reconcilers[service] = asyncio.create_task(self._reconcile_loop(service))

    async def close(self) -> None:
        tasks = list(self._reconcilers.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _reconcile_loop(self, service: str) -> None:
        try:
            while service in self._dirty:
                self._dirty.discard(service)
                try:
                    await self.reconcile(service)
                except Exception as exc:
                    # Every replica's watch saw the same expiry; another one fixes the roster, ours tries again on
                    # the next deletion or resync.
                    _log.warning("etcd_roster_reconcile_failed", service=service, error=str(exc))
        finally:
            self._reconcilers.pop(service, None)

    async def reconcile(self, service: str) -> None:
        """Make the roster name exactly the live instance keys (a compare-and-swap: one replica's write lands)."""
        roster_key, prefix = self._roster_key(service), self._key(service)
        while True:
            _, (roster, kvs) = await self._kv.txn([], [etcd_kv.get(roster_key), etcd_kv.get_prefix(prefix)])
            live = {kv.key[len(prefix) :].decode() for kv in kvs}
            if _ids(roster) == live:
                return
            succeeded, _ = await self._kv.txn(
                [etcd_kv.mod_is(roster_key, _mod(roster))], [etcd_kv.put(roster_key, _roster(live))]
            )
            if succeeded:
                return

    async def reconcile_all(self) -> None:
        """Reconcile every roster that disagrees with the live keys (expiries no replica watched)."""
        _, (rosters, kvs) = await self._kv.txn(
            [], [etcd_kv.get_prefix(self._rosters), etcd_kv.get_prefix(self._instances)]
        )
        live: dict[str, set[str]] = {}
        for kv in kvs:
            service, _, instance_id = kv.key[len(self._instances) :].decode().partition("/")
            live.setdefault(service, set()).add(instance_id)
        listed = {kv.key[len(self._rosters) :].decode(): _ids([kv]) for kv in rosters}
        for service in set(live) | set(listed):
            if live.get(service, set()) != listed.get(service, set()):
                await self.reconcile(service)
