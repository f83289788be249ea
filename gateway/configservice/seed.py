"""``--seed DIR``: fill an empty config service from files, on start-up.

``DIR/bundles/<name>/`` (a bundle directory) or ``DIR/bundles/<name>.tar.gz`` is stored as bundle ``name`` unless a
bundle of that name exists; then ``DIR/services/<service>.yaml`` (``.yml``, ``.json``) as the first version of
``service`` unless it has a version. Existing data always wins: a restart never overwrites what an operator pushed
since, so the seed is only a first state (the way a compose deployment starts with its configs in place).

A seed is checked exactly like a push (the gateway's compiler, the bundles it names), all of it before anything is
stored: a bad seed stops the service before it listens, stores nothing, and ``SeedError`` lists every problem
prefixed with its file.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from gateway.config.bootstrap import is_bundle_name
from gateway.config.compile import SERVICE_NAME
from gateway.config.document import load_text
from gateway.config.errors import DOCUMENT, ConfigError, Problem
from gateway.configservice.configs import check_push, store_checked
from gateway.configservice.http import ApiState
from gateway.configservice.store import BundleRecord
from gateway.configservice.validate import check_bundle
from policy.bundle import build_tarball
from policy.engine import PolicyLoadError

__all__ = ["CONFIG_SUFFIXES", "SEED_AUTHOR", "SeedError", "SeedFiles", "read_seed", "seed"]

SEED_AUTHOR = "seed"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
_TARBALL = ".tar.gz"

log = structlog.get_logger("meshgate.configservice")


class SeedError(Exception):
    """The seed directory has problems; nothing was stored."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(problem) for problem in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class SeedFiles:
    """What a seed directory holds, read and parsed: ``(name, file, tarball bytes)`` per bundle and
    ``(service, file, document)`` per service config."""

    bundles: list[tuple[str, Path, bytes]]
    services: list[tuple[str, Path, object]]


async def seed(state: ApiState, directory: Path) -> list[str]:
    """Store what ``directory`` holds and the service lacks; the names stored (``bundle NAME``, ``service NAME``).

    Everything to be stored is checked before anything is: a ``SeedError`` leaves the store as it was."""
    files = await asyncio.to_thread(read_seed, directory)
    problems: list[Problem] = []
    bundles: list[BundleRecord] = []
    for name, path, data in files.bundles:
        if await state.store.get_bundle(name) is not None:
            continue
        bundle, found = await asyncio.to_thread(check_bundle, data)
        problems += [_in_file(path, problem) for problem in found]
        if bundle is not None:
            digest = hashlib.sha256(data).hexdigest()
            bundles.append(BundleRecord(name, data, digest, bundle.revision, SEED_AUTHOR, state.clock()))
    pending = {record.name: record.data for record in bundles}  # a seeded config may name a seeded bundle
    services: list[tuple[str, Path, Mapping[str, Any]]] = []
    for service, path, document in files.services:
        if await state.store.latest(service) is not None:
            continue
        checked, found = await check_push(state, service, document, pending=pending)
        problems += [_in_file(path, problem) for problem in found]
        services.append((service, path, checked))
    if problems:
        raise SeedError(problems)

    for record in bundles:
        await state.store.put_bundle(record)
        state.metrics.bundle_stored(record.name, record.revision, None)
        log.info("bundle_seeded", bundle=record.name, revision=record.revision)
    for service, path, checked in services:
        info, _created = await store_checked(state, service, checked, SEED_AUTHOR)
        log.info("config_seeded", service_name=service, version=info.version, source=str(path))
    return [f"bundle {record.name}" for record in bundles] + [f"service {name}" for name, _, _ in services]


def read_seed(directory: Path) -> SeedFiles:
    """Read every bundle and config under ``directory``; ``SeedError`` listing every file that cannot be read or
    parsed, or is misnamed (whether it would be stored or not: a broken seed is reported on every start)."""
    if not directory.is_dir():
        raise SeedError([Problem(str(directory), "seed directory not found")])
    files, problems = SeedFiles([], []), []
    for path in _listing(directory / "bundles"):
        name = path.name[: -len(_TARBALL)] if path.name.endswith(_TARBALL) else path.name
        try:
            if not (path.is_dir() or path.name.endswith(_TARBALL)):
                raise SeedError([Problem(str(path), "expected a bundle directory or a .tar.gz bundle")])
            if not is_bundle_name(name):
                raise SeedError([Problem(str(path), f"{name!r} is not a bundle name (letters, digits, . _ -)")])
            files.bundles.append((name, path, _tarball(path) if path.is_dir() else path.read_bytes()))
        except SeedError as error:
            problems += error.problems
        except OSError as error:
            problems.append(Problem(str(path), f"cannot read: {error.strerror or error}"))
    seen: dict[str, Path] = {}
    for path in _listing(directory / "services"):
        try:
            files.services.append((path.stem, path, _service(path, seen)))
        except SeedError as error:
            problems += error.problems
    if problems:
        raise SeedError(problems)
    return files


def _service(path: Path, seen: dict[str, Path]) -> object:
    if path.suffix not in CONFIG_SUFFIXES:
        raise SeedError([Problem(str(path), "expected a service config: NAME.yaml, NAME.yml or NAME.json")])
    if not SERVICE_NAME.fullmatch(path.stem):
        raise SeedError([Problem(str(path), f"{path.stem!r} is not a service name")])
    if path.stem in seen:
        raise SeedError([Problem(str(path), f"a second config for service {path.stem!r} (also {seen[path.stem]})")])
    seen[path.stem] = path
    try:
        return load_text(path.read_text(encoding="utf-8"))
    except ConfigError as error:
        raise SeedError([_in_file(path, problem) for problem in error.problems]) from None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise SeedError([Problem(str(path), f"cannot read: {reason}")]) from None


def _listing(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.iterdir() if not path.name.startswith("."))


def _tarball(directory: Path) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bundle.tar.gz"
        try:
            build_tarball(directory, out)  # reproducible: the same directory always gives the same ETag
        except PolicyLoadError as error:
            raise SeedError([Problem(str(directory), str(error))]) from None
        return out.read_bytes()


def _in_file(path: Path, problem: Problem) -> Problem:
    return Problem(str(path) if problem.path == DOCUMENT else f"{path}: {problem.path}", problem.message)
