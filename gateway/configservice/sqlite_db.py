"""The SQLite side of ``store_sqlite.py``: the schema and one function per change or query.

Every function here runs on the store's one database thread (never on the event loop) and takes the connection
first. Each change is one transaction (``BEGIN IMMEDIATE``); config versions and bundles are committed with
``synchronous=FULL`` (fsynced), soft state (heartbeats, gateway reports) with ``NORMAL``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from gateway.configservice.store import (
    BundleRecord,
    ConfigVersion,
    GatewayReport,
    Instance,
    InstanceList,
    VersionInfo,
)

__all__ = [
    "DB_NAME",
    "LOCK_NAME",
    "ListResult",
    "StoreBusy",
    "close",
    "connect",
    "delete_instance",
    "get_bundle",
    "get_version",
    "list_instances",
    "load_gateways",
    "lock",
    "next_expiry",
    "put_bundle",
    "put_config",
    "put_gateway",
    "put_gateways",
    "put_instance",
    "sweep_all",
    "versions",
]

DB_NAME: Final = "configservice.db"
LOCK_NAME: Final = "configservice.lock"

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS config_versions (
    service TEXT NOT NULL, version INTEGER NOT NULL, hash TEXT NOT NULL, author TEXT NOT NULL,
    created_at REAL NOT NULL, rollback_of INTEGER, document TEXT NOT NULL,
    PRIMARY KEY (service, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bundles (
    name TEXT PRIMARY KEY, data BLOB NOT NULL, etag TEXT NOT NULL, revision TEXT NOT NULL, author TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    service TEXT NOT NULL, id TEXT NOT NULL, address TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (service, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS instances_by_expiry ON instances (expires_at);
CREATE TABLE IF NOT EXISTS instance_lists (service TEXT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gateways (
    service TEXT NOT NULL, id TEXT NOT NULL, applied_version INTEGER NOT NULL, rejected_version INTEGER NOT NULL,
    error TEXT NOT NULL, last_seen REAL NOT NULL,
    PRIMARY KEY (service, id)
) WITHOUT ROWID;
"""

# (the service's list after the change, whether its version moved, the earliest expiry of all instances)
ListResult = tuple[InstanceList, bool, float | None]


class StoreBusy(Exception):
    """Another process holds the data directory."""


def lock(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StoreBusy(f"{path.parent} is in use by another configservice process (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE) so each change is exactly one.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.executescript(_SCHEMA)
    return conn


def close(conn: sqlite3.Connection) -> None:
    conn.close()


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection, *, durable: bool = False) -> Iterator[None]:
    if durable:
        conn.execute("PRAGMA synchronous=FULL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")
    finally:
        if durable:
            conn.execute("PRAGMA synchronous=NORMAL")


_VERSION_COLUMNS = "version, hash, author, created_at, rollback_of, document"


def _version(row: tuple[Any, ...]) -> ConfigVersion:
    version, content_hash, author, created_at, rollback_of, document = row
    return ConfigVersion(VersionInfo(version, content_hash, author, created_at, rollback_of), json.loads(document))


def put_config(
    conn: sqlite3.Connection,
    service: str,
    text: str,
    content_hash: str,
    author: str,
    rollback_of: int | None,
    now: float,
) -> tuple[ConfigVersion, bool]:
    with _transaction(conn, durable=True):
        row = conn.execute(
            f"SELECT {_VERSION_COLUMNS} FROM config_versions WHERE service = ? ORDER BY version DESC LIMIT 1",
            (service,),
        ).fetchone()
        if row is not None and row[1] == content_hash:
            return _version(row), False
        number = (row[0] if row is not None else 0) + 1
        conn.execute(
            f"INSERT INTO config_versions (service, {_VERSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (service, number, content_hash, author, now, rollback_of, text),
        )
    return ConfigVersion(VersionInfo(number, content_hash, author, now, rollback_of), json.loads(text)), True


def get_version(conn: sqlite3.Connection, service: str, version: int | None) -> ConfigVersion | None:
    if version is None:
        query = f"SELECT {_VERSION_COLUMNS} FROM config_versions WHERE service = ? ORDER BY version DESC LIMIT 1"
        row = conn.execute(query, (service,)).fetchone()
    else:
        query = f"SELECT {_VERSION_COLUMNS} FROM config_versions WHERE service = ? AND version = ?"
        row = conn.execute(query, (service, version)).fetchone()
    return _version(row) if row is not None else None


def versions(conn: sqlite3.Connection, service: str) -> list[VersionInfo]:
    rows = conn.execute(
        "SELECT version, hash, author, created_at, rollback_of FROM config_versions WHERE service = ? ORDER BY version",
        (service,),
    )
    return [VersionInfo(*row) for row in rows]


def put_bundle(conn: sqlite3.Connection, record: BundleRecord) -> None:
    with _transaction(conn, durable=True):
        conn.execute(
            "INSERT OR REPLACE INTO bundles (name, data, etag, revision, author, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (record.name, record.data, record.etag, record.revision, record.author, record.created_at),
        )


def get_bundle(conn: sqlite3.Connection, name: str) -> BundleRecord | None:
    row = conn.execute(
        "SELECT name, data, etag, revision, author, created_at FROM bundles WHERE name = ?", (name,)
    ).fetchone()
    return BundleRecord(row[0], bytes(row[1]), *row[2:]) if row is not None else None


def _sweep_service(conn: sqlite3.Connection, service: str, now: float) -> bool:
    return conn.execute("DELETE FROM instances WHERE service = ? AND expires_at <= ?", (service, now)).rowcount > 0


def _bump(conn: sqlite3.Connection, service: str) -> None:
    conn.execute(
        "INSERT INTO instance_lists (service, version) VALUES (?, 1) "
        "ON CONFLICT (service) DO UPDATE SET version = version + 1",
        (service,),
    )


def _listing(conn: sqlite3.Connection, service: str, changed: bool) -> ListResult:
    row = conn.execute("SELECT version FROM instance_lists WHERE service = ?", (service,)).fetchone()
    rows = conn.execute(
        "SELECT id, address, expires_at FROM instances WHERE service = ? ORDER BY id", (service,)
    ).fetchall()
    next_expiry = conn.execute("SELECT MIN(expires_at) FROM instances").fetchone()[0]
    return InstanceList(row[0] if row else 0, tuple(Instance(*r) for r in rows)), changed, next_expiry


def put_instance(
    conn: sqlite3.Connection, service: str, instance_id: str, address: str, expires_at: float, now: float
) -> ListResult:
    with _transaction(conn):
        changed = _sweep_service(conn, service, now)
        row = conn.execute(
            "SELECT address FROM instances WHERE service = ? AND id = ?", (service, instance_id)
        ).fetchone()
        # A heartbeat that changes nothing but the expiry is not a change of the list: watchers sleep on.
        changed = changed or row is None or row[0] != address
        conn.execute(
            "INSERT OR REPLACE INTO instances (service, id, address, expires_at) VALUES (?, ?, ?, ?)",
            (service, instance_id, address, expires_at),
        )
        if changed:
            _bump(conn, service)
        return _listing(conn, service, changed)


def delete_instance(conn: sqlite3.Connection, service: str, instance_id: str, now: float) -> tuple[ListResult, bool]:
    with _transaction(conn):
        swept = _sweep_service(conn, service, now)
        deleted = (
            conn.execute("DELETE FROM instances WHERE service = ? AND id = ?", (service, instance_id)).rowcount > 0
        )
        if swept or deleted:
            _bump(conn, service)
        return _listing(conn, service, swept or deleted), deleted


def list_instances(conn: sqlite3.Connection, service: str, now: float) -> ListResult:
    with _transaction(conn):
        changed = _sweep_service(conn, service, now)
        if changed:
            _bump(conn, service)
        return _listing(conn, service, changed)


def sweep_all(conn: sqlite3.Connection, now: float) -> tuple[dict[str, InstanceList], float | None]:
    with _transaction(conn):
        services = [
            row[0] for row in conn.execute("SELECT DISTINCT service FROM instances WHERE expires_at <= ?", (now,))
        ]
        lists: dict[str, InstanceList] = {}
        for service in services:
            _sweep_service(conn, service, now)
            _bump(conn, service)
            lists[service] = _listing(conn, service, True)[0]
        next_expiry = conn.execute("SELECT MIN(expires_at) FROM instances").fetchone()[0]
    return lists, next_expiry


def next_expiry(conn: sqlite3.Connection) -> float | None:
    value = conn.execute("SELECT MIN(expires_at) FROM instances").fetchone()[0]
    return float(value) if value is not None else None


def put_gateway(conn: sqlite3.Connection, report: GatewayReport) -> None:
    put_gateways(conn, [report])


def put_gateways(conn: sqlite3.Connection, reports: list[GatewayReport]) -> None:
    if not reports:
        return
    with _transaction(conn):
        conn.executemany(
            "INSERT OR REPLACE INTO gateways (service, id, applied_version, rejected_version, error, last_seen) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(r.service, r.id, r.applied_version, r.rejected_version, r.error, r.last_seen) for r in reports],
        )


def load_gateways(conn: sqlite3.Connection) -> list[GatewayReport]:
    rows = conn.execute(
        "SELECT service, id, applied_version, rejected_version, error, last_seen FROM gateways ORDER BY service, id"
    )
    return [GatewayReport(*row) for row in rows]
