"""The config service's etcd store: every replica of the service shares one etcd, and a write through any replica
wakes the long-polls parked on every replica.

Key layout, under a prefix (``/meshgate/`` by default):

``services/{s}/versions/{n:012d}``  JSON ``{version, hash, author, created_at, rollback_of, document}`` (immutable)
``services/{s}/latest``             the newest version number, as ASCII digits
``rosters/{s}``                     JSON ``{"ids": [...]}``: the ids of the live instances; its etcd ``mod_revision``
                                    is the instance list's ``version`` (see ``etcd_registry``)
``instances/{s}/{id}``              JSON ``{address, expires_at, ttl}``, attached to an etcd lease of the TTL
``bundles/{name}``                  JSON metadata ``{etag, revision, author, created_at, size, chunks}``
``bundle-chunks/{name}/{etag}/{i:06d}``  the bundle's bytes in chunks of at most 1 MiB
``gateways/{s}/{id}``               JSON gateway report (rewritten when it changes, or every 15 s for last_seen)

Decisions:

* **Versions** are allocated by a transaction that compares ``latest``'s ``mod_revision`` with the one read and
  writes ``versions/{n+1}`` and ``latest`` together; a replica that loses the race re-reads and retries, so two
  replicas never hand out the same number. An unchanged push (the latest version has the same content hash) writes
  nothing.
* **One watch per store**, on the key range from ``instances/`` to ``services/`` (instances, rosters and services, in
  key order; not bundles, whose chunks would flood it, nor gateway reports, which nobody waits on). It resumes from
  the last revision it saw after the stream breaks (with full-jitter backoff), so no change is lost; when etcd has
  compacted that history away it wakes every waiter and re-checks the rosters instead. Waiters park on in-process
  events (``Changes``) that only this watch fires, for the store's own writes too: one path, and etcd's order.
* **Configs seen on the watch are kept** (the newest version per service), so a thousand long-polls woken by one
  new version answer from memory instead of each reading etcd.
* **Instances** live in ``etcd_registry``: each on an etcd lease of its TTL, with a roster key whose revision is the
  list's version (an expiry leaves no key behind to date it), the same on every replica; heartbeats do not move it.
* **Size limits**: etcd refuses a request over ``--max-request-bytes`` (1.5 MiB by default; pass the server's value
  as ``max_request_bytes``). A config version must fit in one request (``ValueError`` "config too large for the
  etcd store" otherwise, an HTTP 413); a bundle is written in chunks, then its metadata is switched to the new
  chunks in one transaction, and the old chunks are deleted, so any size the API accepts fits.
* **Failures**: an unreachable etcd raises ``EtcdUnavailable`` (a ``ConnectionError``) from every call, including
  ``connect``; the API should answer 503. The watch keeps retrying in the background and the store recovers by
  itself when etcd comes back.
* **Operations**: etcd keeps every revision until compacted, bundle chunks included; run it with
  ``--auto-compaction-mode=periodic --auto-compaction-retention=1h`` (and defragment now and then), or its 2 GiB
  default quota fills and it refuses writes. A watch that falls behind a compaction resyncs (above).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import structlog

from gateway.configservice import etcd_kv
from gateway.configservice.changes import Changes, Waiter
from gateway.configservice.etcd_kv import KV, EtcdCompacted, EtcdKV, EtcdUnavailable, WatchEvent
from gateway.configservice.etcd_registry import EtcdRegistry
from gateway.configservice.store import (
    BundleRecord,
    ConfigStore,
    ConfigVersion,
    GatewayReport,
    Instance,
    InstanceList,
    VersionInfo,
)
from gateway.resilience.backoff import full_jitter

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "DEFAULT_PREFIX", "EtcdStore", "EtcdUnavailable"]

DEFAULT_PREFIX = "/meshgate/"
DEFAULT_MAX_REQUEST_BYTES = 1_572_864  # etcd's own --max-request-bytes default (1.5 MiB)
_REQUEST_OVERHEAD = 16 * 1024  # room for the keys, lease ids and protobuf framing around a value in one request
_CHUNK_BYTES = 1024 * 1024
_SEEN_WRITE_INTERVAL = 15.0  # s: a report that only moves last_seen is written at most this often (as SQLite)
_WATCH_BACKOFF = (0.1, 5.0)  # full-jitter base and cap (s) between attempts to re-open a broken watch

_log = structlog.get_logger("meshgate.configservice")


def _json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _check_name(kind: str, name: str) -> str:
    # Names become key segments: a "/" would let one service's keys alias another's.
    if not name or "/" in name:
        raise ValueError(f"{kind} name {name!r}: must be non-empty and contain no '/'")
    return name


def _version_from(kv: KV) -> ConfigVersion:
    raw = json.loads(kv.value)
    info = VersionInfo(
        version=int(raw["version"]),
        hash=str(raw["hash"]),
        author=str(raw["author"]),
        created_at=float(raw["created_at"]),
        rollback_of=None if raw.get("rollback_of") is None else int(raw["rollback_of"]),
    )
    return ConfigVersion(info, raw["document"])


class EtcdStore(ConfigStore):
    """``ConfigStore`` on etcd. Build it with ``await EtcdStore.connect([...])`` inside the running loop; ``await
    close()`` at exit."""

    def __init__(self, kv: EtcdKV, prefix: str, max_request_bytes: int) -> None:
        """Use ``connect``: it checks etcd is reachable and starts the watch."""
        self._kv = kv
        self._prefix = prefix if prefix.endswith("/") else prefix + "/"
        self._max_value = max_request_bytes - _REQUEST_OVERHEAD
        self._chunk = min(_CHUNK_BYTES, self._max_value)
        self._changes = Changes()
        self._waited: set[Hashable] = set()  # keys someone waited on: what a resync must wake
        self._newest: dict[str, ConfigVersion] = {}  # newest version per service seen on the watch
        self._bundles: dict[str, BundleRecord] = {}  # last bundle read or written per name (a 304 reads no chunks)
        self._reports: dict[bytes, GatewayReport] = {}  # last report written per key, by this replica
        self._revision = 0  # the last etcd revision the watch delivered (or the start point)
        self._watching = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self._registry = EtcdRegistry(kv, self._prefix.encode())
        self._rng = random.Random()

    @classmethod
    async def connect(
        cls,
        endpoints: Sequence[str],
        prefix: str = DEFAULT_PREFIX,
        *,
        request_timeout: float = 5.0,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> EtcdStore:
        """Connect to etcd at ``endpoints`` (``host:port``), reconcile the instance rosters, and start the watch.

        Every etcd call has a deadline of ``request_timeout`` seconds; raises ``EtcdUnavailable`` when etcd does not
        answer within it."""
        kv = EtcdKV(endpoints, timeout=request_timeout)
        store = cls(kv, prefix, max_request_bytes)
        try:
            store._revision = await kv.revision()
            await store._registry.reconcile_all()
            store._watch_task = asyncio.create_task(store._run_watch(), name="etcd-store-watch")
            async with asyncio.timeout(request_timeout):
                await store._watching.wait()  # a store that returns is already listening
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        """Stop the watch and the background reconcilers, answer every parked long-poll, close the client."""
        self._changes.close()
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        await self._registry.close()
        await self._kv.close()

    # --- keys ------------------------------------------------------------------------------------------------------
    def _key(self, *parts: str) -> bytes:
        return (self._prefix + "/".join(parts)).encode()

    def _version_key(self, service: str, version: int) -> bytes:
        return self._key("services", service, "versions", f"{version:012d}")

    def _check_size(self, value: bytes, what: str) -> None:
        if len(value) > self._max_value:
            raise ValueError(
                f"{what} too large for the etcd store ({len(value)} bytes encoded; limit {self._max_value}, "
                f"from etcd's --max-request-bytes {self._max_value + _REQUEST_OVERHEAD})"
            )

    # --- configs ---------------------------------------------------------------------------------------------------
    async def put_config(
        self,
        service: str,
        document: Mapping[str, Any],
        content_hash: str,
        author: str,
        *,
        rollback_of: int | None = None,
    ) -> tuple[VersionInfo, bool]:
        latest_key = self._key("services", _check_name("service", service), "latest")
        while True:
            pointer = await self._kv.get(latest_key)
            current = int(pointer.value) if pointer is not None else 0
            if current:
                found = await self.get_version(service, current)
                if found is not None and found.info.hash == content_hash:
                    return found.info, False
            info = VersionInfo(current + 1, content_hash, author, time.time(), rollback_of)
            value = _json({**_info_fields(info), "document": document})
            self._check_size(value, "config")
            version_key = self._version_key(service, info.version)
            succeeded, _ = await self._kv.txn(
                # latest unchanged since read (mod 0 = still absent), and the new number never used
                [
                    etcd_kv.mod_is(latest_key, pointer.mod_revision if pointer else 0),
                    etcd_kv.version_is(version_key, 0),
                ],
                # the version before the pointer: the watch sees the content first and caches it before waking
                [etcd_kv.put(version_key, value), etcd_kv.put(latest_key, str(info.version).encode())],
            )
            if succeeded:
                return info, True

    async def latest(self, service: str) -> ConfigVersion | None:
        pointer = await self._kv.get(self._key("services", _check_name("service", service), "latest"))
        return None if pointer is None else await self.get_version(service, int(pointer.value))

    async def get_version(self, service: str, version: int) -> ConfigVersion | None:
        found = await self._kv.get(self._version_key(_check_name("service", service), version))
        return None if found is None else _version_from(found)

    async def versions(self, service: str) -> list[VersionInfo]:
        kvs = await self._kv.get_prefix(self._key("services", _check_name("service", service), "versions", ""))
        return [_version_from(kv).info for kv in kvs]  # zero-padded numbers: key order is version order

    async def wait_newer(self, service: str, than: int, wait: float) -> ConfigVersion | None:
        deadline = time.monotonic() + wait
        key = ("config", _check_name("service", service))
        while not self._changes.closed:
            waiter = self._waiter(key)  # before reading: a version landing after the read still wakes us
            seen = self._newest.get(service)
            if seen is not None and seen.info.version > than:
                return seen
            found = await self.latest(service)
            if found is not None and found.info.version > than:
                return found
            if not await waiter.wait(deadline - time.monotonic()):
                return None
        return None

    # --- bundles ---------------------------------------------------------------------------------------------------
    async def put_bundle(self, record: BundleRecord) -> None:
        name = _check_name("bundle", record.name)
        meta_key = self._key("bundles", name)
        chunks = math.ceil(len(record.data) / self._chunk)
        meta = _json(
            {
                "etag": record.etag,
                "revision": record.revision,
                "author": record.author,
                "created_at": record.created_at,
                "size": len(record.data),
                "chunks": chunks,
            }
        )
        current = await self._kv.get(meta_key)
        written = False
        while True:
            old_etag = json.loads(current.value)["etag"] if current is not None else None
            if old_etag != record.etag and not written:
                # Chunks first, under a path of their own: readers of the current metadata never see them.
                for index in range(chunks):
                    part = record.data[index * self._chunk : (index + 1) * self._chunk]
                    await self._kv.put(self._chunk_key(name, record.etag, index), part)
                written = True
            succeeded, _ = await self._kv.txn(
                [etcd_kv.mod_is(meta_key, current.mod_revision if current is not None else 0)],
                [etcd_kv.put(meta_key, meta)],
            )
            if succeeded:
                break
            current = await self._kv.get(meta_key)  # another replica switched it: replace whatever is there now
        if old_etag is not None and old_etag != record.etag:
            prefix = self._key("bundle-chunks", name, old_etag, "")
            await self._kv.txn([], [etcd_kv.delete_prefix(prefix)])
        self._bundles[name] = record

    async def get_bundle(self, name: str) -> BundleRecord | None:
        meta_key = self._key("bundles", _check_name("bundle", name))
        for _ in range(3):  # the chunks vanish under a reader only when a new upload replaces them mid-read
            found = await self._kv.get(meta_key)
            if found is None:
                return None
            meta = json.loads(found.value)
            record = BundleRecord(
                name, b"", str(meta["etag"]), str(meta["revision"]), str(meta["author"]), float(meta["created_at"])
            )
            cached = self._bundles.get(name)
            if cached is not None and cached.etag == record.etag:
                return BundleRecord(name, cached.data, record.etag, record.revision, record.author, record.created_at)
            parts = await self._kv.get_prefix(self._key("bundle-chunks", name, record.etag, ""))
            data = b"".join(part.value for part in parts)
            if len(parts) == int(meta["chunks"]) and len(data) == int(meta["size"]):
                record = BundleRecord(name, data, record.etag, record.revision, record.author, record.created_at)
                self._bundles[name] = record
                return record
        raise etcd_kv.EtcdError(f"bundle {name!r}: replaced three times while being read, try again")

    def _chunk_key(self, name: str, etag: str, index: int) -> bytes:
        return self._key("bundle-chunks", name, etag, f"{index:06d}")

    # --- instance registry -----------------------------------------------------------------------------------------
    async def put_instance(self, service: str, instance_id: str, address: str, ttl: float) -> Instance:
        return await self._registry.put(
            _check_name("service", service), _check_name("instance", instance_id), address, ttl
        )

    async def delete_instance(self, service: str, instance_id: str) -> bool:
        return await self._registry.delete(_check_name("service", service), _check_name("instance", instance_id))

    async def instances(self, service: str) -> InstanceList:
        return await self._registry.listing(_check_name("service", service))

    async def wait_instances(self, service: str, than: int, wait: float) -> InstanceList | None:
        deadline = time.monotonic() + wait
        key = ("instances", _check_name("service", service))
        while not self._changes.closed:
            waiter = self._waiter(key)
            found = await self.instances(service)
            if found.version > than:
                return found
            if not await waiter.wait(deadline - time.monotonic()):
                return None
        return None

    # --- gateway status --------------------------------------------------------------------------------------------
    async def report_gateway(self, report: GatewayReport) -> None:
        key = self._key("gateways", _check_name("service", report.service), _check_name("gateway", report.id))
        written = self._reports.get(key)
        if (
            written is not None
            and (written.applied_version, written.rejected_version, written.error)
            == (report.applied_version, report.rejected_version, report.error)
            and report.last_seen - written.last_seen < _SEEN_WRITE_INTERVAL
        ):
            return  # only last_seen moved, and recently written: a fleet polling every few seconds costs no write
        await self._kv.put(
            key,
            _json(
                {
                    "service": report.service,
                    "id": report.id,
                    "applied_version": report.applied_version,
                    "rejected_version": report.rejected_version,
                    "error": report.error,
                    "last_seen": report.last_seen,
                }
            ),
        )
        self._reports[key] = report

    async def gateways(self) -> list[GatewayReport]:
        reports = []
        for kv in await self._kv.get_prefix(self._key("gateways", "")):
            raw = json.loads(kv.value)
            reports.append(
                GatewayReport(
                    str(raw["service"]),
                    str(raw["id"]),
                    int(raw["applied_version"]),
                    int(raw["rejected_version"]),
                    str(raw["error"]),
                    float(raw["last_seen"]),
                )
            )
        return reports

    # --- the watch -------------------------------------------------------------------------------------------------
    def _waiter(self, key: Hashable) -> Waiter:
        self._waited.add(key)
        return self._changes.waiter(key)

    async def _run_watch(self) -> None:
        """Feed ``_on_event`` from etcd for the store's whole life, re-opening the watch when the stream breaks."""
        low = self._key("instances", "")
        high = etcd_kv.prefix_end(self._key("services", ""))  # instances/, rosters/, services/: contiguous keys
        failures = 0
        resync = False
        while True:
            try:
                if resync:
                    self._revision = await self._kv.revision()
                watch = await self._kv.watch(low, high, self._revision + 1)
                try:
                    self._watching.set()
                    if failures or resync:
                        _log.info("etcd_watch_resumed", revision=self._revision, resync=resync)
                    failures = 0
                    if resync:
                        await self._resync()
                        resync = False
                    async for event in watch.events():
                        self._on_event(event)
                finally:
                    await watch.cancel()
                raise EtcdUnavailable("etcd watch stream ended")
            except EtcdCompacted as exc:
                # The history since our last revision is gone: start from now and re-check everything instead.
                _log.warning("etcd_watch_compacted", revision=self._revision, error=str(exc))
                resync = True
            except Exception as exc:
                delay = full_jitter(failures, *_WATCH_BACKOFF, self._rng)
                failures += 1
                _log.warning("etcd_watch_broken", error=str(exc), retry_in_s=round(delay, 3), failures=failures)
                await asyncio.sleep(delay)

    def _on_event(self, event: WatchEvent) -> None:
        self._revision = max(self._revision, event.kv.mod_revision)
        parts = event.kv.key[len(self._prefix) :].decode().split("/")
        if parts[0] == "services" and len(parts) == 4 and parts[2] == "versions" and event.kind == "put":
            version = _version_from(event.kv)
            seen = self._newest.get(parts[1])
            if seen is None or version.info.version > seen.info.version:
                self._newest[parts[1]] = version
        elif parts[0] == "services" and len(parts) == 3 and parts[2] == "latest":
            seen = self._newest.get(parts[1])
            if seen is not None and (event.kind == "delete" or seen.info.version > int(event.kv.value)):
                # The pointer went back (etcd restored from a backup): the kept version is no longer the store's, and
                # serving it would flip gateways between it and the real latest on every poll.
                del self._newest[parts[1]]
            self._changes.changed(("config", parts[1]))
        elif parts[0] == "rosters" and len(parts) == 2:
            self._changes.changed(("instances", parts[1]))
        elif parts[0] == "instances" and len(parts) == 3 and event.kind == "delete":
            self._registry.deleted(parts[1])  # an expiry (or a delete, whose roster write makes this a no-op)

    async def _resync(self) -> None:
        self._newest.clear()  # the missed history may have moved a pointer back: re-read, never trust the old ones
        for key in list(self._waited):
            self._changes.changed(key)
        await self._registry.reconcile_all()


def _info_fields(info: VersionInfo) -> dict[str, Any]:
    return {
        "version": info.version,
        "hash": info.hash,
        "author": info.author,
        "created_at": info.created_at,
        "rollback_of": info.rollback_of,
    }
