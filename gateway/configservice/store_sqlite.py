"""The embedded store: one SQLite file (``DIR/configservice.db``), no other process needed.

- **One thread owns the connection.** Every statement runs on a single dedicated thread, so the event loop never
  blocks on the disk and SQLite never sees two writers of this process at once. A second process on the same DIR
  is refused (an exclusive ``flock`` on ``DIR/configservice.lock``): the in-memory caches and wake-ups below are
  only right while this process is the file's one writer; several replicas share etcd instead.
- **One transaction per change** (``BEGIN IMMEDIATE``), WAL journal. Version numbers are allocated inside the write
  transaction (max + 1), so they never repeat. Config versions and bundles are committed with
  ``synchronous=FULL`` (fsynced: a version number handed out survives a power cut and is never handed out again);
  heartbeats and gateway reports are soft state and commit with ``NORMAL`` (atomic, durable across a crash of
  this process).
- **Reads that watchers repeat come from memory.** The latest version of each service, each service's instance
  list and small bundles are cached; every write goes through this process, so the cache is never stale. A
  thousand watchers woken by one push read the new version without a thousand queries.
- **Instances expire on read and on a timer.** A listing drops instances past ``expires_at`` (deleting them and
  bumping the list's version in the same transaction, so the ETag matches the content); one timer, set for the
  earliest expiry of all instances, does the same for lists nobody reads, so watchers wake when an instance expires.
- **Gateway reports** are kept in memory and written through only when something other than ``last_seen`` changes,
  or when the stored ``last_seen`` is ``_SEEN_WRITE_INTERVAL`` old: a fleet polling every few seconds costs no
  write per poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

from gateway.configservice import sqlite_db as db
from gateway.configservice.changes import Changes
from gateway.configservice.sqlite_db import DB_NAME, ListResult, StoreBusy
from gateway.configservice.store import (
    BundleRecord,
    ConfigVersion,
    GatewayReport,
    Instance,
    InstanceList,
    VersionInfo,
)

__all__ = ["SqliteStore", "StoreBusy"]

# Bundles up to this size stay in memory after the first read (gateways re-fetch them every few seconds).
_CACHED_BUNDLE_BYTES: Final = 8 * 1024 * 1024
_SEEN_WRITE_INTERVAL: Final = 15.0


T = TypeVar("T")


class SqliteStore:
    """``ConfigStore`` on one SQLite file. Create with ``await SqliteStore.open(directory)``."""

    def __init__(
        self, conn: sqlite3.Connection, executor: ThreadPoolExecutor, lock_fd: int, clock: Callable[[], float]
    ) -> None:
        self._conn = conn
        self._executor = executor
        self._lock_fd = lock_fd
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self.changes = Changes()
        self._latest: dict[str, ConfigVersion | None] = {}
        self._lists: dict[str, InstanceList] = {}
        self._bundles: dict[str, BundleRecord] = {}
        self._gateways: dict[tuple[str, str], GatewayReport] = {}
        self._seen_written: dict[tuple[str, str], float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._tasks: set[asyncio.Task[Any]] = set()  # sweeps and shielded writes: waited for by close()

    @classmethod
    async def open(cls, directory: Path, *, clock: Callable[[], float] = time.time) -> SqliteStore:
        """Open (creating) ``directory/configservice.db``; ``StoreBusy`` if another process has the directory."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="configservice-sqlite")
        loop = asyncio.get_running_loop()
        try:
            lock_fd = await loop.run_in_executor(executor, db.lock, directory)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        try:
            conn = await loop.run_in_executor(executor, db.connect, directory / DB_NAME)
        except BaseException:
            executor.shutdown(wait=False)
            os.close(lock_fd)
            raise
        store = cls(conn, executor, lock_fd, clock)
        reports = await store._call(db.load_gateways)
        store._gateways = {(r.service, r.id): r for r in reports}
        store._seen_written = {key: r.last_seen for key, r in store._gateways.items()}
        store._schedule(await store._call(db.next_expiry))
        return store

    # --- plumbing ----------------------------------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._loop.run_in_executor(self._executor, functools.partial(fn, self._conn, *args))

    async def _write(self, fn: Callable[..., T], *args: Any, after: Callable[[T], None]) -> T:
        """Run a write and then ``after`` (cache update, wake-ups) even if the caller is cancelled meanwhile: a
        committed change whose watchers were never woken would leave them waiting for the next one."""

        async def write() -> T:
            result = await self._call(fn, *args)
            after(result)
            return result

        task = asyncio.ensure_future(write())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    # --- configs -----------------------------------------------------------------------------------------------------

    async def put_config(
        self,
        service: str,
        document: Mapping[str, Any],
        content_hash: str,
        author: str,
        *,
        rollback_of: int | None = None,
    ) -> tuple[VersionInfo, bool]:
        text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

        def after(result: tuple[ConfigVersion, bool]) -> None:
            self._remember(service, result[0])
            if result[1]:
                self.changes.changed(("config", service))

        version, created = await self._write(
            db.put_config, service, text, content_hash, author, rollback_of, self._clock(), after=after
        )
        return version.info, created

    def _remember(self, service: str, version: ConfigVersion | None) -> None:
        # Monotonic: a read that started before a write must not put the older version back when it returns late.
        cached = self._latest.get(service)
        newer = version is not None and (cached is None or cached.info.version <= version.info.version)
        if newer or service not in self._latest:
            self._latest[service] = version

    async def latest(self, service: str) -> ConfigVersion | None:
        if service in self._latest:
            return self._latest[service]
        found = await self._call(db.get_version, service, None)
        self._remember(service, found)
        return self._latest[service]

    async def get_version(self, service: str, version: int) -> ConfigVersion | None:
        cached = self._latest.get(service)
        if cached is not None and cached.info.version == version:
            return cached
        return await self._call(db.get_version, service, version)

    async def versions(self, service: str) -> list[VersionInfo]:
        return await self._call(db.versions, service)

    async def wait_newer(self, service: str, than: int, wait: float) -> ConfigVersion | None:
        deadline = self._loop.time() + wait
        while True:
            waiter = self.changes.waiter(("config", service))  # before the read: see changes.py
            current = await self.latest(service)
            if current is not None and current.info.version > than:
                return current
            if self.changes.closed or not await waiter.wait(deadline - self._loop.time()):
                return None

    # --- bundles -----------------------------------------------------------------------------------------------------

    async def put_bundle(self, record: BundleRecord) -> None:
        def after(_: None) -> None:
            self._cache_bundle(record)

        await self._write(db.put_bundle, record, after=after)

    def _cache_bundle(self, record: BundleRecord) -> None:
        if len(record.data) <= _CACHED_BUNDLE_BYTES:
            self._bundles[record.name] = record
        else:
            self._bundles.pop(record.name, None)

    async def get_bundle(self, name: str) -> BundleRecord | None:
        cached = self._bundles.get(name)
        if cached is not None:
            return cached
        record = await self._call(db.get_bundle, name)
        if record is not None:
            self._cache_bundle(record)
        return record

    # --- instances ---------------------------------------------------------------------------------------------------

    def _listed(self, service: str, result: ListResult) -> None:
        listing, changed, next_expiry = result
        cached = self._lists.get(service)
        if cached is None or cached.version <= listing.version:
            self._lists[service] = listing
        if changed:
            self.changes.changed(("instances", service))
        self._schedule(next_expiry)

    async def put_instance(self, service: str, instance_id: str, address: str, ttl: float) -> Instance:
        expires_at = self._clock() + ttl

        def after(result: ListResult) -> None:
            self._listed(service, result)

        await self._write(db.put_instance, service, instance_id, address, expires_at, self._clock(), after=after)
        return Instance(instance_id, address, expires_at)

    async def delete_instance(self, service: str, instance_id: str) -> bool:
        def after(result: tuple[ListResult, bool]) -> None:
            self._listed(service, result[0])

        _, deleted = await self._write(db.delete_instance, service, instance_id, self._clock(), after=after)
        return deleted

    async def instances(self, service: str) -> InstanceList:
        cached = self._lists.get(service)
        now = self._clock()
        if cached is not None and all(instance.expires_at > now for instance in cached.instances):
            return cached

        def after(result: ListResult) -> None:
            self._listed(service, result)

        await self._write(db.list_instances, service, now, after=after)  # a write: it may sweep expired instances
        return self._lists[service]

    async def wait_instances(self, service: str, than: int, wait: float) -> InstanceList | None:
        deadline = self._loop.time() + wait
        while True:
            waiter = self.changes.waiter(("instances", service))
            current = await self.instances(service)
            if current.version > than:
                return current
            if self.changes.closed or not await waiter.wait(deadline - self._loop.time()):
                return None

    def _schedule(self, at: float | None) -> None:
        """Keep one timer, at the earliest expiry of any instance (never one per instance, never a polling loop)."""
        if at is None or at >= self._timer_at or self.changes.closed:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        # A millisecond late, so the sweep's clock reading is past the expiry rather than exactly at it.
        self._timer = self._loop.call_later(max(0.0, at - self._clock()) + 0.001, self._sweep_due)

    def _sweep_due(self) -> None:
        self._timer, self._timer_at = None, math.inf
        task = asyncio.ensure_future(self._sweep())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        lists, next_expiry = await self._call(db.sweep_all, self._clock())
        for service, listing in lists.items():
            self._listed(service, (listing, True, None))
        self._schedule(next_expiry)

    # --- gateway status ----------------------------------------------------------------------------------------------

    async def report_gateway(self, report: GatewayReport) -> None:
        key = (report.service, report.id)
        old = self._gateways.get(key)
        self._gateways[key] = report
        material = old is None or (old.applied_version, old.rejected_version, old.error) != (
            report.applied_version,
            report.rejected_version,
            report.error,
        )
        if material or report.last_seen - self._seen_written.get(key, 0.0) >= _SEEN_WRITE_INTERVAL:
            self._seen_written[key] = report.last_seen
            await self._write(db.put_gateway, report, after=lambda _: None)

    async def gateways(self) -> list[GatewayReport]:
        return sorted(self._gateways.values(), key=lambda r: (r.service, r.id))

    async def close(self) -> None:
        self.changes.close()
        if self._timer is not None:
            self._timer.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Last-seen times not yet written: the list after a restart shows when each gateway was really last seen.
        pending = [r for key, r in self._gateways.items() if self._seen_written.get(key) != r.last_seen]
        with contextlib.suppress(sqlite3.Error):
            await self._call(db.put_gateways, pending)
        await self._call(db.close)
        self._executor.shutdown(wait=True)
        os.close(self._lock_fd)
