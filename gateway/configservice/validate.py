"""What the config service accepts: pushed configs and policy bundles, checked exactly as a gateway would.

A pushed config is compiled by the gateway's own compiler (``compile_document``) as ``{"service": <the URL's
service>, **pushed}``, so whatever a gateway would refuse is refused here first, with every problem by path. Keys
only a gateway's bootstrap file may set are refused with a reason of their own. ``authz.bundle`` (and
``authz.shadow.bundle``) name bundles stored in this service, not files: once they are known to exist, the policy
is loaded and the decision-cache key checked (``check_policies``) against temporary copies, as the gateway will
load its downloaded copies.

A bundle must load in the embedded engine: ``load_bundle`` (layout, manifest, data) and every module parsed, every
function called defined (unknown built-ins refused) and regorus' static checks passed (``EmbeddedEngine``). Its
decision rule is not known yet (each gateway config names one), so that one check is left to the config push.

``check_config`` is pure; the bundle checks read temporary files and are meant to run in a worker thread.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gateway.config.bootstrap import BOOTSTRAP_ONLY, is_bundle_name
from gateway.config.compile import compile_document
from gateway.config.errors import DOCUMENT, ConfigError, Problem
from gateway.config.snapshot import Snapshot
from gateway.policy_runtime import check_policies
from policy.bundle import Bundle, load_bundle
from policy.engine import PolicyLoadError
from policy.engine_embedded import EmbeddedEngine
from policy.settings import EngineSettings

__all__ = [
    "CheckedConfig",
    "check_bundle",
    "check_config",
    "check_config_bundles",
]


# A decision rule no bundle has: constructing an engine for it runs every module check first and then fails on the
# decision alone. The engine reports the decision last, so that failure means every module check passed.
_PROBE_DECISION: Final = "meshgate_configservice_probe/none"
_PROBE_PROBLEM: Final = f"decision {_PROBE_DECISION}:"
# "file:line: problem" or "file: problem" lines of a PolicyLoadError.
_LOAD_LINE: Final = re.compile(r"^(?P<file>[^\s:][^:]*?)(?::(?P<line>\d+))?: (?P<message>.+)$")
_RECEIVER: Final = {"url": "http://config-service.invalid", "token_file": "gateway.token"}
_ENGINES: Final = (("authz", ()), ("authz.shadow", ("shadow",)))


@dataclass(frozen=True, slots=True)
class CheckedConfig:
    """A pushed config after the pure checks: the snapshot (when it compiled), every problem, and the stored
    bundles it names as ``(where, name)`` (``("authz.bundle", "authz")``)."""

    snapshot: Snapshot | None
    problems: tuple[Problem, ...]
    bundles: tuple[tuple[str, str], ...]


def check_config(service: str, document: object, *, trust_domain: str = "meshgate.local") -> CheckedConfig:
    if not isinstance(document, Mapping):
        try:
            compile_document(document)  # its message for an empty or non-mapping document
        except ConfigError as error:
            return CheckedConfig(None, error.problems, ())
        raise AssertionError("compile_document accepted a document that is not a mapping")
    problems: list[Problem] = [
        Problem(str(key), "set by the gateway's bootstrap file, not by the config service")
        for key in document
        if key in BOOTSTRAP_ONLY
    ]
    pushed = {key: value for key, value in document.items() if key not in BOOTSTRAP_ONLY}
    snapshot: Snapshot | None = None
    try:
        # A pushed version always lands on a gateway whose bootstrap has a config_service section (that is how it
        # got here), and a registry-discovered cluster needs one: compile it as the gateway will, with a stand-in.
        # Likewise a cluster's `mesh_identity` needs the bootstrap's `mesh` (in this service's trust domain).
        mesh = {"mtls": "disabled", "trust_domain": trust_domain}
        snapshot = compile_document({"service": service, "config_service": _RECEIVER, "mesh": mesh, **pushed})
    except ConfigError as error:
        problems.extend(error.problems)
    bundles: list[tuple[str, str]] = []
    for where, path in _ENGINES:
        name = _embedded_bundle(document.get("authz"), path)
        if name is None:
            continue
        if not is_bundle_name(name):
            problems.append(
                Problem(
                    f"{where}.bundle",
                    f"{name!r} is not a bundle name: authz.bundle names a bundle stored in the config service "
                    "(PUT /v1/bundles/{name}), not a file path",
                )
            )
        else:
            bundles.append((f"{where}.bundle", name))
    return CheckedConfig(None if problems else snapshot, tuple(problems), tuple(bundles))


def _embedded_bundle(authz: object, path: tuple[str, ...]) -> str | None:
    section = authz
    for key in path:
        section = section.get(key) if isinstance(section, Mapping) else None
    if not isinstance(section, Mapping) or section.get("engine", "embedded") != "embedded":
        return None
    bundle = section.get("bundle")
    return bundle if isinstance(bundle, str) else None


def check_config_bundles(snapshot: Snapshot, bundles: Mapping[str, bytes]) -> list[Problem]:
    """Load the policies of a compiled pushed config from the stored bundles (``name -> .tar.gz`` bytes) and check
    its cache key, as ``meshgate check`` would; the problems, with bundle names (never temporary paths)."""
    authz = snapshot.authz
    if authz is None:
        return []
    with tempfile.TemporaryDirectory(prefix="meshgate-cs-") as directory:
        paths = {}
        for name, data in bundles.items():
            path = Path(directory, f"{name}.tar.gz")
            path.write_bytes(data)
            paths[name] = str(path)

        def local(settings: EngineSettings) -> EngineSettings:
            if settings.bundle is None or settings.bundle not in paths:
                return settings
            return dataclasses.replace(settings, bundle=paths[settings.bundle])

        shadow = local(authz.shadow) if authz.shadow is not None else None
        local_authz = dataclasses.replace(authz, primary=local(authz.primary), shadow=shadow)
        try:
            check_policies(dataclasses.replace(snapshot, authz=local_authz))
        except ConfigError as error:
            names = {path: f"bundle {name!r}" for name, path in paths.items()}
            return [Problem(p.path, _unpath(p.message, names)) for p in error.problems]
    return []


def check_bundle(data: bytes) -> tuple[Bundle | None, list[Problem]]:
    """Whether ``data`` (a ``.tar.gz``) is an OPA bundle the embedded engine loads: ``(bundle, [])`` or
    ``(None, problems)`` with the file inside the bundle as each problem's path."""
    with tempfile.TemporaryDirectory(prefix="meshgate-cs-") as directory:
        path = Path(directory, "bundle.tar.gz")
        path.write_bytes(data)
        names = {str(path): "(bundle)"}
        try:
            bundle = load_bundle(path)
        except PolicyLoadError as error:
            return None, [_load_problem(_unpath(line, names)) for line in str(error).splitlines()]
        try:
            EmbeddedEngine(bundle, _PROBE_DECISION)
        except PolicyLoadError as error:
            lines = [line for line in str(error).splitlines() if not line.startswith(_PROBE_PROBLEM)]
            if lines:
                return None, [_load_problem(_unpath(line, names)) for line in lines]
    # The engine refused only the probe decision (or, by chance, the bundle defines it): every module check passed.
    return bundle, []


def _unpath(message: str, names: Mapping[str, str]) -> str:
    for path, name in names.items():
        message = message.replace(path, name)
    return message


def _load_problem(line: str) -> Problem:
    match = _LOAD_LINE.match(line)
    if match is None:
        return Problem(DOCUMENT, line)
    where = match["file"]
    message = match["message"]
    return Problem(where, f"line {match['line']}: {message}" if match["line"] else message)
