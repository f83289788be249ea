"""SnapshotStore: check a compiled snapshot against what is serving, build its policy and upstream runtimes, swap once.

The only writer of ``GatewayServer.serving``. A snapshot that cannot be applied (a listener address or parser limit
changed: those need a restart) is refused with a ``ConfigError`` and the last good config keeps serving.
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

    async def apply(self, snapshot: Snapshot, source: str) -> Serving:
        """Serve ``snapshot`` from now on, or raise ConfigError and keep serving the current one.

        A raised ConfigError is not counted or logged here: the caller reports it with ``rejected()``.
        """
        current = self.current
        if current is not None:
            if snapshot.hash == current.snapshot.hash:
                return current  # an edit that changed nothing (touch, rewrite of the same content)
            problems = [
                Problem(path, "cannot change while running (restart meshgate to apply)")
                for path, get in _RESTART_ONLY
                if get(snapshot) != get(current.snapshot)
            ]
            if problems:
                # Not counted here: the source catches the error and calls rejected(), which counts and logs it
                # (counting in both places made one refused edit show up as two rejections).
                raise ConfigError(tuple(problems))
        # Policies first: a bundle that fails to load rejects the config before any upstream state changes.
        policy = await self._policies.apply(snapshot)
        self._version += 1
        stamped = dataclasses.replace(snapshot, version=self._version, source=source, loaded_at=time.time())
        clusters = await self._upstreams.apply(stamped.clusters)
        serving = Serving(stamped, clusters, policy)
        self.current = serving
        self._publish(serving)  # the atomic swap: one attribute store, read once per request
        self._metrics.config_version.set(stamped.version)
        self._metrics.config_reloads.labels("applied").inc()
        log.info("config_applied", version=stamped.version, source=source, hash=stamped.hash)
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
