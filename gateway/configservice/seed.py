"""``--seed DIR``: fill an empty config service from files, on start-up.

``DIR/bundles/<name>/`` (a bundle directory) or ``DIR/bundles/<name>.tar.gz`` is stored as bundle ``name`` unless a
bundle of that name exists; then ``DIR/services/<service>.yaml`` (``.yml``, ``.json``) as the first version of
``service`` unless it has a version. Existing data always wins: a restart never overwrites what an operator pushed
since, so the seed is only a first state (the way a compose deployment starts with its configs in place).

A seed is checked exactly like a push (the gateway's compiler, the bundles it names), and one bad file stops the
service before it listens: ``SeedError`` lists every problem prefixed with its file.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog

from gateway.config.compile import SERVICE_NAME
from gateway.config.document import load_text
from gateway.config.errors import DOCUMENT, ConfigError, Problem
from gateway.configservice.configs import check_push, store_checked
from gateway.configservice.http import ApiState
from gateway.configservice.store import BundleRecord
from gateway.configservice.validate import check_bundle
from policy.bundle import build_tarball
from policy.engine import PolicyLoadError

__all__ = ["SEED_AUTHOR", "SeedError", "SeedFiles", "read_seed", "seed"]

SEED_AUTHOR = "seed"
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
_TARBALL = ".tar.gz"

log = structlog.get_logger("meshgate.configservice")


class SeedError(Exception):
    """The seed directory has problems; nothing after the first bad file was stored."""

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
    """Store what ``directory`` holds and the service lacks; the names stored (``bundle NAME``, ``service NAME``)."""
    files = await asyncio.to_thread(read_seed, directory)
    stored: list[str] = []
    # Bundles first: a seeded config may name them.
    for name, path, data in files.bundles:
        if await state.store.get_bundle(name) is None:
            await _seed_bundle(state, name, path, data)
            stored.append(f"bundle {name}")
    for service, path, document in files.services:
        if await state.store.latest(service) is None:
            checked, problems = await check_push(state, service, document)
            if problems:
                raise SeedError([_in_file(path, problem) for problem in problems])
            info, _created = await store_checked(state, service, checked, SEED_AUTHOR)
            log.info("config_seeded", service_name=service, version=info.version, source=str(path))
            stored.append(f"service {service}")
    return stored


def read_seed(directory: Path) -> SeedFiles:
    """Read every bundle and config under ``directory``; ``SeedError`` for a file that cannot be read or parsed
    (whether it would be stored or not: a broken seed is reported on every start, not only the first)."""
    if not directory.is_dir():
        raise SeedError([Problem(str(directory), "seed directory not found")])
    files = SeedFiles([], [])
    for path in _listing(directory / "bundles"):
        if path.is_dir():
            files.bundles.append((path.name, path, _tarball(path)))
        elif path.name.endswith(_TARBALL):
            files.bundles.append((path.name[: -len(_TARBALL)], path, path.read_bytes()))
        else:
            raise SeedError([Problem(str(path), "expected a bundle directory or a .tar.gz bundle")])
    for path in _listing(directory / "services"):
        if path.suffix not in _CONFIG_SUFFIXES:
            raise SeedError([Problem(str(path), "expected a service config: NAME.yaml, NAME.yml or NAME.json")])
        if not SERVICE_NAME.fullmatch(path.stem):
            raise SeedError([Problem(str(path), f"{path.stem!r} is not a service name")])
        try:
            document = load_text(path.read_text(encoding="utf-8"))
        except ConfigError as error:
            raise SeedError([_in_file(path, problem) for problem in error.problems]) from None
        except (OSError, UnicodeDecodeError) as error:
            raise SeedError([Problem(str(path), f"cannot read: {error}")]) from None
        files.services.append((path.stem, path, document))
    return files


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


async def _seed_bundle(state: ApiState, name: str, path: Path, data: bytes) -> None:
    bundle, problems = await asyncio.to_thread(check_bundle, data)
    if bundle is None:
        raise SeedError([_in_file(path, problem) for problem in problems])
    digest = hashlib.sha256(data).hexdigest()
    await state.store.put_bundle(BundleRecord(name, data, digest, bundle.revision, SEED_AUTHOR, state.clock()))
    state.metrics.bundle_stored(name, bundle.revision, None)
    log.info("bundle_seeded", bundle=name, revision=bundle.revision, source=str(path))


def _in_file(path: Path, problem: Problem) -> Problem:
    return Problem(str(path) if problem.path == DOCUMENT else f"{path}: {problem.path}", problem.message)
