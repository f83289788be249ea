"""Load an OPA bundle (a directory or a ``.tar.gz``) into a ``Bundle``; write one; tell cheaply whether it changed.

The layout is OPA's: an optional ``.manifest`` (JSON: ``revision``, ``roots``, ``rego_version``), ``*.rego`` files
anywhere below the root, and ``data.json`` / ``data.yaml`` files whose directory is their place in ``data``
(``a/b/data.json`` -> ``data.a.b``). ``*_test.rego`` files are kept apart (``Bundle.tests``) for the test runner;
they are never served. Every problem is a ``PolicyLoadError`` naming the file inside the bundle.

Tarballs are read in memory and never extracted, so a member name cannot write anywhere; names are still checked
(no ``..``, no links or devices, no absolute name other than OPA's own ``/x`` form) so that a bundle means the same
thing here as in OPA. Sizes are bounded before anything is read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

import yaml

from policy.engine import PolicyLoadError

__all__ = ["MAX_BUNDLE_BYTES", "MAX_BUNDLE_FILES", "Bundle", "build_tarball", "fingerprint", "load_bundle"]

MAX_BUNDLE_BYTES: Final = 64 * 1024 * 1024  # uncompressed total: a tarball is checked before it is inflated
MAX_BUNDLE_FILES: Final = 10_000

_MANIFEST = ".manifest"
_DATA_NAMES = frozenset({"data.json", "data.yaml", "data.yml"})
# The first `package` clause; a quoted segment (`package a["b-c"]`) is left to the engine and skips the roots check.
_PACKAGE = re.compile(r"^[ \t]*package[ \t]+([A-Za-z_][A-Za-z0-9_.]*)[ \t]*(?:#.*)?$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Bundle:
    """A loaded bundle. ``modules``/``tests`` are ``(relative file name, text)`` sorted by name; ``data`` is the
    merged document; ``revision`` is the manifest's or ``sha256:`` + 16 hex digits of the content."""

    modules: tuple[tuple[str, str], ...]
    tests: tuple[tuple[str, str], ...]
    data: dict[str, Any]
    revision: str
    rego_version: int
    source: str
    roots: tuple[str, ...] = ("",)


def load_bundle(path: str | Path) -> Bundle:
    """The bundle at ``path`` (a directory, or a gzipped tarball), or ``PolicyLoadError`` naming what is wrong."""
    path = Path(path)
    if path.is_dir():
        files = dict(_read_directory(path))
    elif path.is_file():
        files = dict(_read_tarball(path))
    else:
        raise PolicyLoadError(f"{path}: no such bundle directory or file")
    return _assemble(files, str(path))


def fingerprint(path: str | Path) -> str:
    """A cheap change detector for hot reload: names, sizes and mtimes (no content is read); ``"absent"`` when the
    path is gone, so the poller sees a change and the following load reports it."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        if path.is_dir():
            for file in sorted(_walk(path)):
                stat = file.stat()
                digest.update(f"{file.relative_to(path).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        else:
            stat = path.stat()
            digest.update(f"{stat.st_ino}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    except FileNotFoundError:
        return "absent"
    return digest.hexdigest()[:32]


def build_tarball(bundle_dir: str | Path, out_path: str | Path) -> Bundle:
    """Write ``bundle_dir`` as an OPA bundle ``.tar.gz`` at ``out_path`` and return the bundle it holds.

    The directory is loaded first, so a broken bundle is never written. The archive is reproducible (sorted members,
    zero mtimes and owners), so the same files always give the same bytes.
    """
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    files = dict(_read_directory(bundle_dir))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(files[name]), 0o644, 0
            archive.addfile(info, io.BytesIO(files[name]))
    out_path = Path(out_path)
    out_path.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
    return bundle


# --------------------------------------------------------------------------------------------- reading


def _walk(root: Path) -> Iterator[Path]:
    """Regular files below ``root``, hidden ones skipped except ``.manifest`` at the root (as OPA does)."""
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(names):
            file = Path(directory, name)
            if (name.startswith(".") and file != root / _MANIFEST) or not file.is_file():
                continue
            yield file


def _read_directory(root: Path) -> Iterator[tuple[str, bytes]]:
    total = count = 0
    for file in _walk(root):
        name = file.relative_to(root).as_posix()
        if not _wanted(name):
            continue
        count += 1
        total += file.stat().st_size
        _check_limits(name, count, total)
        try:
            yield name, file.read_bytes()
        except OSError as error:
            raise PolicyLoadError(f"{name}: cannot read: {error.strerror or error}") from None


def _read_tarball(path: Path) -> Iterator[tuple[str, bytes]]:
    total = count = 0
    try:
        with tarfile.open(path, mode="r:gz") as archive:
            for member in archive:
                name = _member_name(member)
                if name is None or not _wanted(name):
                    continue
                count += 1
                total += member.size
                _check_limits(name, count, total)  # before extractfile: the header's size is checked, not inflated
                stream = archive.extractfile(member)
                assert stream is not None  # a regular file (checked by _member_name)
                yield name, stream.read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise PolicyLoadError(f"{path}: not a readable .tar.gz bundle: {error}") from None


def _member_name(member: tarfile.TarInfo) -> str | None:
    """The bundle-relative name of a regular file member; ``None`` for directories; unsafe members are errors."""
    raw = member.name
    # `opa build` writes "/data.json", "/.manifest": one leading slash is OPA's layout, not an escape.
    name = raw[1:] if raw.startswith("/") and not raw.startswith("//") else raw
    parts = PurePosixPath(name).parts
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\0" in name
        or ".." in parts
        or re.match(r"[A-Za-z]:", name)
    ):
        raise PolicyLoadError(f"{raw}: unsafe member name in bundle tarball (absolute, '..' or drive path)")
    if member.isdir():
        return None
    if not member.isfile():
        kind = "link" if member.issym() or member.islnk() else "special file"
        raise PolicyLoadError(f"{raw}: bundle tarball member is a {kind}; only regular files are allowed")
    return PurePosixPath(*(part for part in parts if part != ".")).as_posix()


def _wanted(name: str) -> bool:
    """Files that make up a bundle; anything else (README, .signatures.json, editor files) is ignored."""
    base = name.rsplit("/", 1)[-1]
    return name == _MANIFEST or base.endswith(".rego") or base in _DATA_NAMES


def _check_limits(name: str, count: int, total: int) -> None:
    if count > MAX_BUNDLE_FILES:
        raise PolicyLoadError(f"{name}: bundle has more than {MAX_BUNDLE_FILES} files")
    if total > MAX_BUNDLE_BYTES:
        raise PolicyLoadError(f"{name}: bundle is larger than {MAX_BUNDLE_BYTES // (1024 * 1024)} MiB uncompressed")


# --------------------------------------------------------------------------------------------- assembling


def _assemble(files: dict[str, bytes], source: str) -> Bundle:
    manifest = _manifest(files[_MANIFEST]) if _MANIFEST in files else {}
    roots = _roots(manifest)
    rego_version = manifest.get("rego_version", 1)
    if rego_version not in (0, 1) or isinstance(rego_version, bool):
        raise PolicyLoadError(f"{_MANIFEST}: rego_version must be 0 or 1, not {rego_version!r}")
    revision = manifest.get("revision")
    if revision is not None and not isinstance(revision, str):
        raise PolicyLoadError(f"{_MANIFEST}: revision must be a string, not {revision!r}")

    modules: list[tuple[str, str]] = []
    tests: list[tuple[str, str]] = []
    data: dict[str, Any] = {}
    mounts: dict[tuple[str, ...], str] = {}
    for name in sorted(files):
        if name == _MANIFEST:
            continue
        text = _text(name, files[name])
        if name.endswith(".rego"):
            (tests if name.endswith("_test.rego") else modules).append((name, text))
            # Tests too: OPA loads a bundle's test files as modules, so a test package outside the roots makes a
            # real OPA refuse the bundle that the embedded engine (which leaves tests out) would have taken.
            _check_package_root(name, text, roots)
            continue
        at = tuple(PurePosixPath(name).parent.parts)
        document = _document(name, text, root=not at)
        _check_data_roots(name, at, document, roots)
        _merge(data, at, document, name, mounts)
        mounts[at] = name
    if not modules:
        raise PolicyLoadError(f"{source}: bundle has no .rego policy files (files ending in _test.rego do not count)")
    return Bundle(
        modules=tuple(modules),
        tests=tuple(tests),
        data=data,
        revision=revision or _content_revision(files),
        rego_version=int(rego_version),
        source=source,
        roots=roots,
    )


def _text(name: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PolicyLoadError(f"{name}: not UTF-8 text (byte {error.start})") from None


def _manifest(raw: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(_text(_MANIFEST, raw))
    except json.JSONDecodeError as error:
        raise PolicyLoadError(f"{_MANIFEST}:{error.lineno}: invalid JSON: {error.msg}") from None
    if not isinstance(manifest, dict):
        raise PolicyLoadError(f"{_MANIFEST}: must hold a JSON object")
    return manifest


def _roots(manifest: dict[str, Any]) -> tuple[str, ...]:
    roots = manifest.get("roots", [""])
    if not isinstance(roots, list) or not all(isinstance(root, str) for root in roots):
        raise PolicyLoadError(f"{_MANIFEST}: roots must be a list of strings")
    return tuple(root.strip("/") for root in roots)


def _document(name: str, text: str, *, root: bool) -> Any:
    try:
        document = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise PolicyLoadError(f"{name}:{error.lineno}: invalid JSON: {error.msg}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        raise PolicyLoadError(f"{where}: invalid YAML: {getattr(error, 'problem', None) or error}") from None
    if root and not isinstance(document, dict):
        raise PolicyLoadError(f"{name}: must hold an object (it is the whole data document)")
    return document


def _merge(
    data: dict[str, Any], at: tuple[str, ...], document: Any, name: str, mounts: dict[tuple[str, ...], str]
) -> None:
    """Mount ``document`` at ``at``, merging objects; two files giving one path different non-object values is an
    error (OPA refuses such a bundle too)."""

    def conflict(path: tuple[str, ...]) -> PolicyLoadError:
        other = next((f for m, f in mounts.items() if path[: len(m)] == m or m[: len(path)] == path), "another file")
        shown = ".".join(("data", *path))
        return PolicyLoadError(f"{name}: data path {shown} conflicts with {other}")

    def into(target: dict[str, Any], source: dict[str, Any], path: tuple[str, ...]) -> None:
        for key, value in source.items():
            if key not in target:
                target[key] = value
            elif isinstance(target[key], dict) and isinstance(value, dict):
                into(target[key], value, (*path, key))
            else:
                raise conflict((*path, key))

    if not at:
        into(data, document, ())
        return
    parent = data
    for depth, part in enumerate(at[:-1]):
        parent = parent.setdefault(part, {})
        if not isinstance(parent, dict):
            raise conflict(at[: depth + 1])
    into(parent, {at[-1]: document}, at[:-1])


def _under(path: Iterable[str], root: str) -> bool:
    """Whether ``path`` lies at or below ``root`` ("" is the whole tree)."""
    root_parts = tuple(part for part in root.split("/") if part)
    return tuple(path)[: len(root_parts)] == root_parts


def _check_data_roots(name: str, at: tuple[str, ...], document: dict[str, Any], roots: tuple[str, ...]) -> None:
    def check(path: tuple[str, ...], value: Any) -> None:
        if any(_under(path, root) for root in roots):
            return
        # Not inside a root, but a root may lie deeper below this object: look at its keys.
        above = [r for r in roots if tuple(p for p in r.split("/") if p)[: len(path)] == path]
        if above and isinstance(value, dict):
            for key, child in value.items():
                check((*path, key), child)
            return
        shown = ".".join(("data", *path))
        raise PolicyLoadError(f"{name}: data path {shown} is outside the manifest roots {list(roots)}")

    check(at, document)


def _check_package_root(name: str, text: str, roots: tuple[str, ...]) -> None:
    if roots == ("",):
        return
    match = _PACKAGE.search(text)
    if match is None:
        return  # no simple package clause: the engine reports what is wrong with it
    package = tuple(match.group(1).split("."))
    if not any(_under(package, root) for root in roots):
        raise PolicyLoadError(f"{name}: package {match.group(1)} is outside the manifest roots {list(roots)}")


def _content_revision(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + str(len(files[name])).encode() + b"\0" + files[name])
    return "sha256:" + digest.hexdigest()[:16]
