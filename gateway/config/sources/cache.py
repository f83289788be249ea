"""The last good config a gateway got from its config service, on disk, so a restart can serve without the service.

Everything lives under ``cache_dir/<service>/`` (``service_dir``): two sidecars of different services whose
bootstraps sit in one directory share the default ``cache_dir`` but never a file.

- ``config.json``: the pushed part (what a restart compiles again with the bootstrap as it is then), its version and
  ETag, the bundle files it was applied with (``{name: sha256}``), the config service's URL, and the merged config
  (for the operator to read).
- ``bundles/<name>/<sha256>.tar.gz``: downloaded bundles, stored by content (``bundles.py``).
- ``instances/<registry service>.json``: the last instance list of each registry service a cluster follows
  (``upstream/registry.py``), so a restart without the service does not start those clusters empty.

Every write is a temp file in the same directory renamed over the old one: a reader (or a crash) sees the old file
or the new one, never half of either. The directory is the gateway's own (mode 0700, files 0600): the config may
carry settings worth keeping private.

Blocking file I/O: callers run these in a thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CACHE_FILE",
    "Cached",
    "CacheError",
    "read_cached",
    "read_instances",
    "service_dir",
    "write_atomic",
    "write_cached",
    "write_instances",
]

CACHE_FILE = "config.json"
_FORMAT = 1
_SHA256_HEX = frozenset("0123456789abcdef")


class CacheError(Exception):
    """The cache file exists but cannot be used (unreadable, not ours, another service's)."""


@dataclass(frozen=True, slots=True)
class Cached:
    version: int
    etag: str
    pushed: Mapping[str, Any]
    url: str | None = None  # the config service it came from (None: written before the URL was recorded)
    bundles: Mapping[str, str] = field(default_factory=dict)  # bundle name -> sha256 of the file applied


def service_dir(cache_dir: str | Path, service: str) -> Path:
    """``cache_dir/<service>``: this service's part of the cache. A service name (``[a-z0-9._-]``, starting and
    ending with a letter or digit) is always one safe path component."""
    return Path(cache_dir) / service


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename (temp file in the same directory, fsynced first)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def write_cached(
    directory: Path,
    service: str,
    url: str,
    version: int,
    etag: str,
    pushed: Mapping[str, Any],
    merged: Mapping[str, Any],
    bundles: Mapping[str, str],
) -> None:
    """Write ``directory/config.json`` (``directory``: the service's own, see ``service_dir``)."""
    body = {
        "format": _FORMAT,
        "service": service,
        "url": url,
        "version": version,
        "etag": etag,
        "bundles": dict(bundles),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pushed": pushed,
        "config": merged,
    }
    write_atomic(directory / CACHE_FILE, json.dumps(body, indent=1, sort_keys=True).encode("utf-8"))


def read_cached(directory: Path, service: str) -> Cached | None:
    """The cached version, ``None`` when there is none; ``CacheError`` when the file is there but unusable."""
    path = directory / CACHE_FILE
    try:
        body = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CacheError(f"cannot read {path}: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != _FORMAT:
        raise CacheError(f"{path} is not a meshgate config cache")
    if body.get("service") != service:
        # A cache directory reused for another service: its routes are not this service's.
        raise CacheError(f"{path} holds service {body.get('service')!r}, not {service!r}")
    version, etag, pushed = body.get("version"), body.get("etag"), body.get("pushed")
    url, bundles = body.get("url"), body.get("bundles", {})
    if not isinstance(version, int) or not isinstance(etag, str) or not isinstance(pushed, dict):
        raise CacheError(f"{path} is incomplete")
    if not (url is None or isinstance(url, str)) or not _digests(bundles):
        raise CacheError(f"{path} is incomplete")
    return Cached(version, etag, pushed, url, bundles)


def _digests(value: object) -> bool:
    # Each digest becomes a file name: only what sha256 hexdigest() writes.
    return isinstance(value, dict) and all(
        isinstance(name, str) and isinstance(digest, str) and len(digest) == 64 and set(digest) <= _SHA256_HEX
        for name, digest in value.items()
    )


# --- registry instance lists ----------------------------------------------------------------------------------------


def write_instances(directory: Path, registry_service: str, url: str, version: int, addresses: list[str]) -> None:
    """Write ``directory/instances/<registry_service>.json``: the last list the registry answered."""
    body = {
        "format": _FORMAT,
        "service": registry_service,
        "url": url,
        "version": version,
        "addresses": addresses,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_atomic(_instances_file(directory, registry_service), json.dumps(body, indent=1).encode("utf-8"))


def read_instances(directory: Path, registry_service: str) -> list[str] | None:
    """The cached ``host:port`` list of ``registry_service``; ``None`` when there is none; ``CacheError`` when the
    file is there but unusable."""
    path = _instances_file(directory, registry_service)
    try:
        body = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CacheError(f"cannot read {path}: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != _FORMAT or body.get("service") != registry_service:
        raise CacheError(f"{path} is not a meshgate instance cache for {registry_service!r}")
    addresses = body.get("addresses")
    if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
        raise CacheError(f"{path} is incomplete")
    return addresses


def _instances_file(directory: Path, registry_service: str) -> Path:
    # Registry service names are checked as gateway service names by the compiler: one safe path component.
    return directory / "instances" / f"{registry_service}.json"
