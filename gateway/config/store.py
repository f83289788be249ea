"""SnapshotStore: check a compiled snapshot against what is serving, build its policy and upstream runtimes, swap once.

The only writer of ``GatewayServer.serving``. A snapshot that cannot be applied (a listener address or parser limit
changed, or TLS turned on or off: those need a restart; a certificate, key or CA file that does not load) is refused
with a ``ConfigError`` and the last good config keeps serving.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import structlog

from gateway.config.errors import ConfigError, Problem
from gateway.config.snapshot import Snapshot
from gateway.policy_runtime import Policies
from gateway.serving import Serving
from gateway.tls.contexts import ClientTls, server_context, upstream_contexts
from gateway.upstream.clusters import Upstreams
from telemetry.metrics import Metrics

__all__ = ["SnapshotStore"]

log = structlog.get_logger("meshgate.config")

# Settings bound into the listening socket or its parser when it starts; changing them needs a restart.
_RESTART_ONLY: tuple[tuple[str, Callable[[Snapshot], object]], ...] = (
    ("listen", lambda s: s.listen),
    ("admin", lambda s: s.admin),
    ("limits.max_request_line", lambda s: s.limits.max_request_line),
    ("limits.max_header_size", lambda s: s.limits.max_header_size),
    ("limits.max_headers", lambda s: s.limits.max_headers),
    ("config_service", lambda s: s.config_service),  # file or config service: chosen once, at start-up
    # The socket is bound with or without TLS; new certificate files or paths are loaded live (tls/reloader.py).
    ("tls", lambda s: s.tls is not None),
    # OpenSSL copies "ask for a client certificate" into each connection from the bound context: not switchable.
    ("tls.client_ca_file", lambda s: s.tls is not None and s.tls.client_ca_file is not None),
    # The listener is bound in the mesh's mode (strict, permissive, disabled); a bootstrap-only key besides.
    ("mesh", lambda s: s.mesh),
)


class SnapshotStore:
    def __init__(
        self,
        upstreams: Upstreams,
        metrics: Metrics,
        publish: Callable[[Serving], None],
        policies: Policies | None = None,
    ) -> None:
        self._upstreams = upstreams
        self._policies = policies if policies is not None else Policies()
        self._metrics = metrics
        self._publish = publish
        self.current: Serving | None = None
        self._version = 0
        self._bound: Snapshot | None = None

    def bind(self, snapshot: Snapshot) -> None:
        """The listeners were started with ``snapshot``'s restart-only settings before any config served (a
        bootstrap file): the first applied config must match them too."""
        self._bound = snapshot

    async def apply(self, snapshot: Snapshot, source: str, *, version: int | None = None) -> Serving:
        """Serve ``snapshot`` from now on, or raise ConfigError and keep serving the current one.

        ``version``: the config service's version number (shown by /config and ``meshgate_config_version``);
        ``None`` numbers applied configs 1, 2, 3 ... in this process. A raised ConfigError is not counted or logged
        here: the caller reports it with ``rejected()``.
        """
        current = self.current
        if current is not None and snapshot.hash == current.snapshot.hash:
            if version is None or (version, source) == (current.snapshot.version, current.snapshot.source):
                return current  # an edit that changed nothing (touch, rewrite of the same content)
            # The same content under another version or source (a rollback, the service confirming the cached
            # copy): runtimes are kept, only the provenance changes.
            return self._swap(Serving(self._stamp(current.snapshot, source, version), current.clusters, current.policy))
        reference = current.snapshot if current is not None else self._bound
        if reference is not None:
            problems = [
                Problem(path, "cannot change while running (restart meshgate to apply)")
                for path, get in _RESTART_ONLY
                if get(snapshot) != get(reference)
            ]
            if problems:
                # Not counted here: the source catches the error and calls rejected(), which counts and logs it
                # (counting in both places made one refused edit show up as two rejections).
                raise ConfigError(tuple(problems))
        # TLS files first: a certificate that does not load rejects the config before anything else is touched.
        tls = _load_tls(snapshot, reference)
        # Policies next: a bundle that fails to load rejects the config before any upstream state changes.
        policy = await self._policies.apply(snapshot)
        stamped = self._stamp(snapshot, source, version)
        clusters = await self._upstreams.apply(stamped.clusters, tls)
        return self._swap(Serving(stamped, clusters, policy))

    def _stamp(self, snapshot: Snapshot, source: str, version: int | None) -> Snapshot:
        self._version = version if version is not None else self._version + 1
        return dataclasses.replace(snapshot, version=self._version, source=source, loaded_at=time.time())

    def _swap(self, serving: Serving) -> Serving:
        self.current = serving
        self._publish(serving)  # the atomic swap: one attribute store, read once per request
        stamped = serving.snapshot
        self._metrics.config_version.set(stamped.version)
        self._metrics.config_reloads.labels("applied").inc()
        log.info("config_applied", version=stamped.version, source=stamped.source, hash=stamped.hash)
        return serving

    def rejected(self, source: str, error: ConfigError) -> None:
        """Record a config that failed to compile: counted, logged with every problem, nothing else changes."""
        self._metrics.config_reloads.labels("rejected").inc()
        log.error(
            "config_rejected",
            source=source,
            errors=[{"path": p.path, "message": p.message} for p in error.problems],
            serving_version=self.current.snapshot.version if self.current else None,
        )


def _load_tls(snapshot: Snapshot, reference: Snapshot | None) -> dict[str, ClientTls]:
    """Read the TLS files ``snapshot`` names: ConfigError if any does not load. Returns the clusters' contexts.

    The listener's files are only checked when its settings changed: unchanged, the certificate watcher owns them,
    and a certificate mid-rotation on disk must not block an unrelated route change.
    """
    problems: list[Problem] = []
    if snapshot.tls is not None and (reference is None or reference.tls != snapshot.tls):
        try:
            server_context(snapshot.tls)
        except ConfigError as error:
            problems.extend(error.problems)
    contexts: dict[str, ClientTls] = {}
    try:
        contexts = upstream_contexts(snapshot.clusters)
    except ConfigError as error:
        problems.extend(error.problems)
    if problems:
        raise ConfigError(problems)
    for name, cluster in snapshot.clusters.items():
        if cluster.tls is not None and cluster.tls.insecure_skip_verify:
            # Loud at every apply, not once: a config that turns verification off must never go unnoticed.
            log.warning(
                "upstream_tls_verification_disabled",
                upstream=name,
                detail="insecure_skip_verify: true; the upstream's certificate and name are not checked",
            )
    return contexts
