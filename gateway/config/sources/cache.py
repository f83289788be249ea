"""The last good config a gateway got from its config service, on disk, so a restart can serve without the service.

``cache_dir/config.json`` holds the pushed part (what a restart compiles again with the bootstrap as it is then),
its version and ETag, and the merged config (for the operator to read). Every write is a temp file in the same
directory renamed over the old one: a reader (or a crash) sees the old file or the new one, never half of either.
The directory is the gateway's own (mode 0700, files 0600): the config may carry settings worth keeping private.

Blocking file I/O: the remote source calls these in a thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CACHE_FILE", "Cached", "CacheError", "read_cached", "write_atomic", "write_cached"]

CACHE_FILE = "config.json"
_FORMAT = 1


class CacheError(Exception):
    """The cache file exists but cannot be used (unreadable, not ours, another service's)."""


@dataclass(frozen=True, slots=True)
class Cached:
    version: int
    etag: str
    pushed: Mapping[str, Any]


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
    cache_dir: Path, service: str, version: int, etag: str, pushed: Mapping[str, Any], merged: Mapping[str, Any]
) -> None:
    body = {
        "format": _FORMAT,
        "service": service,
        "version": version,
        "etag": etag,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pushed": pushed,
        "config": merged,
    }
    write_atomic(cache_dir / CACHE_FILE, json.dumps(body, indent=1, sort_keys=True).encode("utf-8"))


def read_cached(cache_dir: Path, service: str) -> Cached | None:
    """The cached version, ``None`` when there is none; ``CacheError`` when the file is there but unusable."""
    path = cache_dir / CACHE_FILE
    try:
        body = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CacheError(f"cannot read {path}: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != _FORMAT:
        raise CacheError(f"{path} is not a meshgate config cache")
    if body.get("service") != service:
        # A cache directory shared by mistake (or reused for another service): its routes are not this service's.
        raise CacheError(f"{path} holds service {body.get('service')!r}, not {service!r}")
    version, etag, pushed = body.get("version"), body.get("etag"), body.get("pushed")
    if not isinstance(version, int) or not isinstance(etag, str) or not isinstance(pushed, dict):
        raise CacheError(f"{path} is incomplete")
    return Cached(version, etag, pushed)
