"""Watch a config file: on change (or SIGHUP) read, compile and hand the snapshot to the store.

Polling the file's identity (inode, size, mtime) once a second is portable, survives editors that replace the file
by rename, and costs nothing measurable; a content hash then skips rewrites that changed nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path

import structlog

from gateway.config.compile import compile_text
from gateway.config.errors import ConfigError, Problem
from gateway.config.snapshot import Snapshot
from gateway.config.store import SnapshotStore

__all__ = ["FileSource", "read_config", "resolve_paths"]

log = structlog.get_logger("meshgate.config")


def read_config(path: Path) -> Snapshot:
    """Read and compile ``path``; a missing or unreadable file is a ConfigError like any other problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError((Problem(str(path), f"cannot read config file: {reason}"),)) from None
    return resolve_paths(compile_text(text), path.parent)


def resolve_paths(snapshot: Snapshot, base: Path) -> Snapshot:
    """Files a config names (policy bundles, key files, certificates) are relative to the config file, wherever
    meshgate runs."""

    def resolve(name: str | None) -> str | None:
        return None if name is None else str(base / name) if not Path(name).is_absolute() else name

    authn, authz = snapshot.authn, snapshot.authz
    if authn is not None and authn.key_file is not None:
        authn = dataclasses.replace(authn, key_file=resolve(authn.key_file))
    if authz is not None:
        primary = dataclasses.replace(authz.primary, bundle=resolve(authz.primary.bundle))
        shadow = authz.shadow and dataclasses.replace(authz.shadow, bundle=resolve(authz.shadow.bundle))
        authz = dataclasses.replace(authz, primary=primary, shadow=shadow)
    config_service = snapshot.config_service
    if config_service is not None:
        config_service = dataclasses.replace(
            config_service,
            token_file=str(resolve(config_service.token_file)),
            cache_dir=str(resolve(config_service.cache_dir)),
        )
    tls = snapshot.tls
    if tls is not None:
        tls = dataclasses.replace(
            tls,
            cert_file=str(resolve(tls.cert_file)),
            key_file=str(resolve(tls.key_file)),
            client_ca_file=resolve(tls.client_ca_file),
        )
    clusters = {
        name: cluster
        if cluster.tls is None
        else dataclasses.replace(
            cluster,
            tls=dataclasses.replace(
                cluster.tls,
                ca_file=resolve(cluster.tls.ca_file),
                cert_file=resolve(cluster.tls.cert_file),
                key_file=resolve(cluster.tls.key_file),
            ),
        )
        for name, cluster in snapshot.clusters.items()
    }
    return dataclasses.replace(
        snapshot, authn=authn, authz=authz, config_service=config_service, tls=tls, clusters=clusters
    )


class FileSource:
    def __init__(self, path: Path, store: SnapshotStore, interval: float = 1.0) -> None:
        self._path = path
        self._store = store
        self._interval = interval
        self._identity: tuple[int, int, int] | None = None
        self._digest = ""
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def source(self) -> str:
        return f"file:{self._path}"

    async def load_initial(self, snapshot: Snapshot) -> None:
        """Serve ``snapshot``, read by the caller with ``read_config`` before anything was bound."""
        self._identity = self._stat()
        self._digest = snapshot.hash
        await self._store.apply(snapshot, self.source)

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def reload(self) -> None:
        """Re-read now (SIGHUP or a detected change). Failures are logged; the last good config keeps serving."""
        async with self._lock:  # a SIGHUP racing the poller must not apply the same file twice
            self._identity = self._stat()
            try:
                snapshot = read_config(self._path)
                if snapshot.hash == self._digest:
                    return
                await self._store.apply(snapshot, self.source)
                self._digest = snapshot.hash
            except ConfigError as error:
                self._store.rejected(self.source, error)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if self._stat() != self._identity:
                await self.reload()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)
