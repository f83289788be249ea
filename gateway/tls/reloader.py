"""The listener's certificate, reloaded from disk without a restart.

The listening socket is bound once, with one ``SSLContext`` (the *bound* context). Loading a new certificate into
that live context would be unsafe: ``load_cert_chain`` installs the certificate before it checks the key, so a
broken pair written mid-rotation would leave the listener with a certificate and no key. Instead each reload builds
a complete new context off to the side, and the bound context's SNI callback (which OpenSSL calls on every
handshake, with or without a server name) switches each new handshake to the newest good one. Connections already
established keep the certificate they were made with; a pair that fails to load is logged (``tls_reload_failed``)
and the previous certificate keeps serving.

Changes are found by polling the files' identity (inode, size, mtime) once a second, like the config file watcher;
SIGHUP and a config that names other files reload at once.

Per-connection settings OpenSSL copies from the bound context when a connection starts (the lowest accepted
version, whether a client certificate is asked for) cannot be switched this way: ``min_version`` is set on the
bound context itself, and turning ``client_ca_file`` on or off needs a restart (``config/store.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl

import structlog

from gateway.config.errors import ConfigError
from gateway.config.snapshot import ListenerTls
from gateway.tls.contexts import certificate_serial, server_context

__all__ = ["ListenerCertificate", "SwappableContext"]

log = structlog.get_logger("meshgate.tls")

_Identity = tuple[tuple[int, int, int] | None, ...]


class SwappableContext:
    """A bound listener context whose certificate (and trust store) new handshakes take from ``install``'s newest
    context. Also the mesh listener's (``gateway/mesh/``), whose certificates come from memory, not files."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self._current = context
        context.sni_callback = self._select

    def install(self, fresh: ssl.SSLContext) -> None:
        """New handshakes use ``fresh`` (complete: certificate, key, CAs); established connections keep theirs."""
        self._current = fresh

    def _select(self, connection: ssl.SSLObject, _server_name: str | None, _bound: ssl.SSLContext) -> None:
        current = self._current
        if current is not self.context:
            connection.context = current  # this handshake (and only it) continues with the newest certificate


class ListenerCertificate(SwappableContext):
    """The bound context and the certificate it currently serves. Built with the settings the process starts with;
    ``ConfigError`` if their files do not load (the gateway then refuses to start)."""

    def __init__(self, settings: ListenerTls, interval: float = 1.0) -> None:
        super().__init__(server_context(settings))
        self._settings = settings
        self._interval = interval
        self._identity = self._stat()
        self._task: asyncio.Task[None] | None = None
        self.serial = certificate_serial(settings.cert_file)

    def configure(self, settings: ListenerTls) -> None:
        """A config was applied: new file paths (or a new ``min_version``) take effect for new handshakes."""
        if settings == self._settings:
            return
        old, self._settings = self._settings, settings
        if settings.min_version != old.min_version:
            self.context.minimum_version = _bound_minimum(settings)  # copied into each connection at its start
        self.reload("config")

    def reload(self, trigger: str) -> bool:
        """Load the files now; ``False`` (logged) if they do not form a good pair, the old certificate kept."""
        self._identity = self._stat()
        try:
            fresh = server_context(self._settings)
        except ConfigError as error:
            log.error(
                "tls_reload_failed",
                trigger=trigger,
                errors=[{"path": p.path, "message": p.message} for p in error.problems],
                serving_serial=self.serial,
            )
            return False
        self.install(fresh)
        self.serial = certificate_serial(self._settings.cert_file)
        log.info("tls_certificate_reloaded", trigger=trigger, cert_file=self._settings.cert_file, serial=self.serial)
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if self._stat() != self._identity:
                self.reload("file_changed")

    def _stat(self) -> _Identity:
        settings = self._settings
        return tuple(_identity(path) for path in (settings.cert_file, settings.key_file, settings.client_ca_file))


def _identity(path: str | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _bound_minimum(settings: ListenerTls) -> ssl.TLSVersion:
    return ssl.TLSVersion.TLSv1_3 if settings.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
