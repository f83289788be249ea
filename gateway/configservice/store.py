"""What the config service keeps, and the one storage protocol behind it (SQLite file or etcd).

Records are plain frozen data. A store is the only shared state of the service: several replicas on one etcd see
the same versions, bundles, instances and gateway reports, and a watcher on any replica wakes when any replica
writes. Waiting is event-driven (an in-process event per key, fed by the store's own writes or by etcd's watch),
never a loop that polls the database, so thousands of idle long-polls cost a parked coroutine each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "BundleRecord",
    "ConfigStore",
    "ConfigVersion",
    "GatewayReport",
    "Instance",
    "InstanceList",
    "VersionInfo",
]


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One stored version of a service's config, without its content (history listings)."""

    version: int  # 1, 2, 3 ... per service, never reused
    hash: str  # canonical hash of the content (gateway.config.document.canonical_hash)
    author: str  # the token name that wrote it
    created_at: float  # unix seconds
    rollback_of: int | None = None  # set when this version re-stores an older version's content


@dataclass(frozen=True, slots=True)
class ConfigVersion:
    info: VersionInfo
    document: Mapping[str, Any]  # the pushed part of a gateway config (routes, clusters, authn, authz ...)


@dataclass(frozen=True, slots=True)
class BundleRecord:
    name: str
    data: bytes  # the .tar.gz exactly as uploaded
    etag: str  # sha256 hex of data: the OPA bundle protocol's ETag (sent quoted)
    revision: str  # the bundle's .manifest revision (or content hash)
    author: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Instance:
    id: str
    address: str  # host:port
    expires_at: float  # unix seconds; an expired instance is never listed


@dataclass(frozen=True, slots=True)
class InstanceList:
    """A service's live instances. ``version`` grows on every join, leave and expiry (for ETag/long-poll)."""

    version: int
    instances: Sequence[Instance]


@dataclass(frozen=True, slots=True)
class GatewayReport:
    """What a polling gateway last said about itself."""

    service: str
    id: str
    applied_version: int  # 0: nothing applied yet
    rejected_version: int  # 0: none; else the newest version this gateway refused to apply
    error: str  # why it refused rejected_version ("" when none)
    last_seen: float  # unix seconds


class ConfigStore(Protocol):
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
        """Store ``document`` as the next version, atomically; ``(info, True)``. If the latest version already has
        ``content_hash``, store nothing and return ``(latest info, False)`` (an unchanged push is not a version)."""
        ...

    async def latest(self, service: str) -> ConfigVersion | None: ...

    async def get_version(self, service: str, version: int) -> ConfigVersion | None: ...

    async def versions(self, service: str) -> list[VersionInfo]:
        """Every version, oldest first."""
        ...

    async def wait_newer(self, service: str, than: int, wait: float) -> ConfigVersion | None:
        """The latest version if it is newer than ``than`` (at once, or as soon as one is written within
        ``wait`` seconds, on any replica); ``None`` when the wait ends with nothing newer."""
        ...

    # --- bundles ---------------------------------------------------------------------------------------------------
    async def put_bundle(self, record: BundleRecord) -> None: ...

    async def get_bundle(self, name: str) -> BundleRecord | None: ...

    # --- instance registry ------------------------------------------------------------------------------------------
    async def put_instance(self, service: str, instance_id: str, address: str, ttl: float) -> Instance:
        """Register or refresh (heartbeat) an instance for ``ttl`` seconds from now."""
        ...

    async def delete_instance(self, service: str, instance_id: str) -> bool:
        """False when there was no such live instance."""
        ...

    async def instances(self, service: str) -> InstanceList: ...

    async def wait_instances(self, service: str, than: int, wait: float) -> InstanceList | None:
        """The list once its version is newer than ``than`` (a join, leave or expiry); ``None`` after ``wait`` s."""
        ...

    # --- gateway status ---------------------------------------------------------------------------------------------
    async def report_gateway(self, report: GatewayReport) -> None: ...

    async def gateways(self) -> list[GatewayReport]: ...

    async def close(self) -> None: ...
