"""Bootstrap files: a gateway config with a ``config_service`` section, completed by what the service pushes.

A bootstrap names the service, the listeners and where the config service is; it may also carry defaults for any
pushed key. A pushed version replaces those keys whole (``authz`` pushed replaces the bootstrap's ``authz``, it is
not merged into it): state of the world, never a patch. Then ``bootstrap + pushed`` goes through the same compiler
as a config file.

Two kinds of paths end up in the compiled snapshot. ``authz.bundle`` in a *pushed* config is the name of a bundle
stored in the config service (the gateway's disk is not the operator's). Bundles are kept by content, under
``cache_dir/<service>/bundles/<name>/<sha256>.tar.gz``: the remote source downloads them, then
``Compiled.with_bundles`` points the snapshot at the exact files. A file is never rewritten in place, so a cached
config always names the bytes it was applied with, and a new bundle is a new snapshot applied like a new version.
Every other relative path (the bootstrap's own bundle, key files, the token file, the cache directory) is relative
to the bootstrap file.

``compile_pushed``, ``Compiled.with_bundles`` and ``merge`` are pure; ``load_config`` and ``read_token`` read
files.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config.compile import compile_document
from gateway.config.document import canonical_hash, load_text
from gateway.config.errors import DOCUMENT, ConfigError, Problem
from gateway.config.schema import describe
from gateway.config.snapshot import ConfigService, Snapshot
from gateway.config.sources.cache import service_dir
from gateway.config.sources.file import resolve_paths
from gateway.config.values import quote

__all__ = [
    "BOOTSTRAP_ONLY",
    "Bootstrap",
    "Compiled",
    "bundle_file",
    "compile_pushed",
    "is_bundle_name",
    "load_config",
    "merge",
    "read_token",
]

# Keys only the bootstrap may set: they say who the gateway is, where it listens and where its config comes from.
# The config service refuses them in a push (422); a gateway refuses them too, should one arrive anyway.
BOOTSTRAP_ONLY = ("service", "listen", "admin", "config_service", "tls", "mesh")
_BUNDLE_NAME = re.compile(r"[A-Za-z0-9._-]+")
_BUNDLE_HINT = 'a bundle stored in the config service: letters, digits, ".", "_", "-"'


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """A bootstrap file as read at start-up. ``snapshot`` is its partial compile (never served: no routes are
    required in it); it gives the listeners, the parser limits, the logs and the ``config_service`` settings."""

    path: Path  # absolute
    document: Mapping[str, Any]
    snapshot: Snapshot

    @property
    def settings(self) -> ConfigService:
        settings = self.snapshot.config_service
        assert settings is not None  # a Bootstrap is only made for a document with the section
        return settings


@dataclass(frozen=True, slots=True)
class Compiled:
    """``bootstrap + pushed`` compiled, with the bundles to download before it is applied, as ``(where, name)``
    (``where`` is the problem path if one fails). ``snapshot`` still names those bundles: apply
    ``with_bundles(...)``, which points them at the downloaded files."""

    snapshot: Snapshot
    bundles: tuple[tuple[str, str], ...]
    directory: Path  # the service's cache directory: bundles are under it

    def with_bundles(self, digests: Mapping[str, str]) -> Snapshot:
        """The snapshot to apply: each pushed bundle pointed at ``bundle_file(directory, name, digests[name])``
        (``KeyError`` if one is missing). Its hash covers those files too: the same config with a new bundle is a
        new snapshot (a real apply, so a bundle that does not load is refused), not a no-op."""
        if not self.bundles:
            return self.snapshot
        authz = self.snapshot.authz
        assert authz is not None  # bundles are only listed for a pushed authz section
        files = {where: str(bundle_file(self.directory, name, digests[name])) for where, name in self.bundles}
        primary, shadow = authz.primary, authz.shadow
        if "authz.bundle" in files:
            primary = dataclasses.replace(primary, bundle=files["authz.bundle"])
        if shadow is not None and "authz.shadow.bundle" in files:
            shadow = dataclasses.replace(shadow, bundle=files["authz.shadow.bundle"])
        digest = canonical_hash({"config": self.snapshot.hash, "bundles": files})
        return dataclasses.replace(
            self.snapshot, authz=dataclasses.replace(authz, primary=primary, shadow=shadow), hash=digest
        )


def load_config(path: Path) -> Snapshot | Bootstrap:
    """Read ``path``: a plain config file compiles to a ``Snapshot`` (as ``read_config``); a file with a
    ``config_service`` section is a ``Bootstrap``, compiled partially. ``ConfigError`` for any problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError((Problem(str(path), f"cannot read config file: {reason}"),)) from None
    document = load_text(text)
    base = path.absolute().parent
    if not (isinstance(document, Mapping) and "config_service" in document):
        return resolve_paths(compile_document(document), path.parent)
    snapshot = resolve_paths(compile_document(document, partial=True), base)
    return Bootstrap(path.absolute(), document, snapshot)


def read_token(path: str | Path) -> str:
    """The bearer token in ``path``, surrounding whitespace stripped; ``ConfigError`` (never showing the token) if
    the file cannot be read or holds nothing."""
    where = "config_service.token_file"
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError((Problem(where, f"cannot read {path}: {reason}"),)) from None
    if not token or any(ch in token for ch in "\r\n"):
        # A newline inside would split the Authorization header: refuse it rather than send half a token.
        raise ConfigError((Problem(where, f"{path} must hold one token on one line"),))
    return token


def merge(bootstrap: Mapping[str, Any], pushed: object) -> dict[str, Any]:
    """``bootstrap`` with every top-level key of ``pushed`` replacing its own; ``ConfigError`` if ``pushed`` is not
    a mapping or sets a bootstrap-only key."""
    if not isinstance(pushed, Mapping):
        raise ConfigError((Problem(DOCUMENT, f"expected a mapping at the top level, got {describe(pushed)}"),))
    problems = [
        Problem(str(key), "set by the gateway's bootstrap file, not by the config service")
        for key in pushed
        if key in BOOTSTRAP_ONLY
    ]
    if problems:
        raise ConfigError(problems)
    return {**bootstrap, **pushed}


def compile_pushed(bootstrap: Bootstrap, pushed: object) -> Compiled:
    """Compile ``bootstrap + pushed``; ``ConfigError`` lists every problem (the version is then rejected)."""
    snapshot = compile_document(merge(bootstrap.document, pushed))
    bundles: tuple[tuple[str, str], ...] = ()
    if isinstance(pushed, Mapping) and "authz" in pushed:
        bundles = _pushed_bundles(snapshot)
    # Paths from the bootstrap (and a pushed key file) are relative to the bootstrap file; pushed bundle names are
    # not paths (``with_bundles`` replaces them with absolute ones).
    resolved = resolve_paths(snapshot, bootstrap.path.parent)
    if bundles:
        resolved = dataclasses.replace(resolved, authz=snapshot.authz)
    directory = service_dir(bootstrap.settings.cache_dir, bootstrap.snapshot.service).absolute()
    return Compiled(resolved, bundles, directory)


def is_bundle_name(name: str) -> bool:
    """Whether ``name`` may name a stored bundle: it becomes a file name in the cache and a key in the store. The
    one check, shared by the gateway and the config service (which must refuse what a gateway would)."""
    return _BUNDLE_NAME.fullmatch(name) is not None and name not in (".", "..")


def bundle_file(directory: Path, name: str, digest: str) -> Path:
    """Where the bundle ``name`` with content ``digest`` (sha256 hex) is kept in the service's cache directory:
    the file the embedded engine loads. Written once, never replaced."""
    return directory / "bundles" / name / f"{digest}.tar.gz"


def _pushed_bundles(snapshot: Snapshot) -> tuple[tuple[str, str], ...]:
    """The pushed ``authz``'s embedded bundles, as ``(where, name)``; ``ConfigError`` for a name that is a path."""
    authz = snapshot.authz
    if authz is None:
        return ()
    bundles: list[tuple[str, str]] = []
    problems: list[Problem] = []
    engines = {"authz": authz.primary, "authz.shadow": authz.shadow}
    for where, engine in engines.items():
        if engine is None or engine.engine != "embedded" or engine.bundle is None:
            continue
        name = engine.bundle
        if not is_bundle_name(name):
            problems.append(Problem(f"{where}.bundle", f"invalid bundle name {quote(name)} ({_BUNDLE_HINT})"))
            continue
        bundles.append((f"{where}.bundle", name))
    if problems:
        raise ConfigError(problems)
    return tuple(bundles)
