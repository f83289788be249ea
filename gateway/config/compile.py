"""The config compiler: YAML/JSON text or a decoded document -> a frozen ``Snapshot``, or ``ConfigError``.

Pure: no I/O, no clock (reading the file and stamping ``version``/``source``/``loaded_at`` is the caller's job).
Every section is decoded even after a problem is found, so the error lists everything wrong at once. This module
owns the top level, ``limits`` and ``rate_limit_service``; ``routes.py``, ``clusters.py`` and ``telemetry.py`` own
their sections, and ``policy.py`` the authn/authz ones.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Literal

from gateway.config.clusters import ClusterSection, compile_clusters
from gateway.config.config_service import compile_config_service
from gateway.config.document import canonical_hash, load_text, redact
from gateway.config.errors import DOCUMENT, ConfigError, Problem
from gateway.config.mesh import compile_mesh
from gateway.config.policy import compile_policy
from gateway.config.routes import compile_routes
from gateway.config.schema import (
    Fields,
    Problems,
    address,
    choice,
    describe,
    duration,
    integer,
    matching,
    size,
)
from gateway.config.snapshot import Address, Limits, RateLimitService, Route, Snapshot
from gateway.config.telemetry import compile_telemetry
from gateway.config.tls import LISTENER_TLS_KEYS, compile_listener_tls, moved_into_tls

__all__ = ["DEFAULT_ADMIN", "DEFAULT_LISTEN", "SERVICE_NAME", "compile_document", "compile_text"]

DEFAULT_LISTEN = Address("127.0.0.1", 8080)
DEFAULT_ADMIN = Address("127.0.0.1", 9901)

TOP_KEYS = (
    "service",
    "listen",
    "admin",
    "routes",
    "clusters",
    "limits",
    "telemetry",
    "rate_limit_service",
    "authn",
    "authz",
    "config_service",
    "tls",
    "mesh",
)
# Never ignored silently: a key this build does not implement is refused, not dropped.
TOP_UNSUPPORTED: tuple[str, ...] = ()
LIMIT_KEYS = ("max_request_line", "max_header_size", "max_headers", "max_body_size", "drain_timeout", "escaped_slashes")
RATE_LIMIT_SERVICE_KEYS = ("redis", "timeout", "prefix")

EscapedSlashes = Literal["unescape", "reject", "keep"]
ESCAPED_SLASHES: tuple[EscapedSlashes, ...] = ("unescape", "reject", "keep")

# The service name is service.name in telemetry and part of mesh identities: DNS-label-like.
SERVICE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?")
_SERVICE_HINT = 'use lower-case letters, digits, ".", "_", "-"; start and end with a letter or digit'
_service = matching(SERVICE_NAME, "service name", _SERVICE_HINT)
# Redis key prefixes: several gateway fleets may share one Redis, each under its own prefix.
_PREFIX = re.compile(r"[A-Za-z0-9:_-]+")
_prefix = matching(_PREFIX, "prefix", 'use letters, digits, ":", "_", "-"')
_LIMITS = Limits()
_MOVED = moved_into_tls(LISTENER_TLS_KEYS)  # `cert_file: ...` at the top level belongs in `tls`
_RATE_LIMIT_SERVICE = RateLimitService(Address("127.0.0.1", 6379))


def compile_text(text: str, *, partial: bool = False) -> Snapshot:
    """Decode YAML (or JSON) ``text`` and compile it; ``ConfigError`` lists every problem found."""
    return compile_document(load_text(text), partial=partial)


def compile_document(document: object, *, partial: bool = False) -> Snapshot:
    """Compile an already decoded document (plain dicts, lists and scalars); ``ConfigError`` lists every problem.

    ``partial``: a bootstrap file, whose routes and clusters come from the config service. ``routes`` and
    ``clusters`` may then be missing (the snapshot has none, and is never served: it only gives the listeners,
    the parser limits, the logs and the ``config_service`` settings); whatever the bootstrap does say is checked.
    """
    if document is None:
        raise ConfigError([Problem(DOCUMENT, "the document is empty")])
    if not isinstance(document, Mapping):
        raise ConfigError([Problem(DOCUMENT, f"expected a mapping at the top level, got {describe(document)}")])
    problems = Problems()
    fields = Fields(document, "", problems, TOP_KEYS, TOP_UNSUPPORTED, _MOVED)
    service = fields.required("service", _service)
    listen, admin = _listeners(fields)
    tls = compile_listener_tls(fields)
    config_service = compile_config_service(fields)
    mesh = compile_mesh(fields)
    # Clusters are compiled first (routes refer to them) but their problems are listed after the routes', in the
    # order the sections usually appear in a file.
    cluster_problems = Problems()
    # `mesh_identity` is checked against the mesh's trust domain ("" when the section has problems of its own).
    trust_domain = mesh.trust_domain if mesh is not None else "" if fields.has("mesh") else None
    section = _clusters(fields, cluster_problems, partial, trust_domain)
    policy = compile_policy(fields)
    routes = _routes(fields, section.names if section is not None else None, partial)
    problems.extend(cluster_problems)
    limits = _limits(fields)
    telemetry = compile_telemetry(fields)
    rate_limit_service = _rate_limit_service(fields)
    if service is None or problems.since(0):
        raise ConfigError(problems.items)
    if section is None:  # only a partial compile gets here without clusters
        section = ClusterSection()
    return Snapshot(
        service=service,
        listen=listen,
        admin=admin,
        routes=tuple(routes),
        clusters=section.clusters,
        limits=limits,
        logs=telemetry.logs,
        tracing=telemetry.tracing,
        metrics=telemetry.metrics,
        rate_limit_service=rate_limit_service,
        authn=policy.authn,
        authz=policy.authz,
        config_service=config_service,
        tls=tls,
        mesh=mesh,
        hash=canonical_hash(document),
        document=redact(document),
    )


def _clusters(top: Fields, problems: Problems, partial: bool, trust_domain: str | None) -> ClusterSection | None:
    if not top.has("clusters"):
        if not partial:
            problems.add("clusters", "required")
        return None
    # Registry discovery asks the config service, so it needs the section that says where that is.
    return compile_clusters(
        top.raw["clusters"], problems, registry_available=top.has("config_service"), trust_domain=trust_domain
    )


def _routes(top: Fields, cluster_names: Collection[str] | None, partial: bool) -> list[Route]:
    if not top.has("routes"):
        if not partial:
            top.problems.add("routes", "required")
        return []
    # Only whether rate_limit_service is there matters to a route; its own problems are reported once, below.
    shared_limits = top.has("rate_limit_service")
    # A route's default `auth` depends on which policy sections exist (they are checked on their own, above).
    return compile_routes(
        top.raw["routes"],
        top.problems,
        cluster_names,
        shared_limits=shared_limits,
        authn=top.has("authn"),
        authz=top.has("authz") and _engine_named(top.raw["authz"]) != "none",
    )


def _engine_named(authz: object) -> object:
    return authz.get("engine", "embedded") if isinstance(authz, Mapping) else None


def _listeners(fields: Fields) -> tuple[Address, Address]:
    mark = fields.problems.mark()
    listen = fields.get("listen", address, DEFAULT_LISTEN)
    admin = fields.get("admin", address, DEFAULT_ADMIN)
    if fields.problems.since(mark) or listen.port != admin.port:
        return listen, admin
    if listen.host.lower() == admin.host.lower():
        fields.problems.add(fields.at("admin"), f"must differ from listen ({listen})")
    elif _wildcard_overlap(listen.host, admin.host):
        # Binding a wildcard and a specific host on one port fails at startup; say so at check time instead.
        fields.problems.add(fields.at("admin"), f"uses the same port as listen ({listen})")
    return listen, admin


def _wildcard_overlap(a: str, b: str) -> bool:
    """Would binding both hosts on one port clash? ``::`` is dual-stack (clashes with all), ``0.0.0.0`` with IPv4."""
    if "::" in (a, b):
        return True
    other = b if a == "0.0.0.0" else a if b == "0.0.0.0" else None
    return other is not None and ":" not in other  # an IPv6 host is another address family


def _limits(top: Fields) -> Limits:
    if not top.has("limits"):
        return _LIMITS
    fields = Fields.of(top.raw["limits"], "limits", top.problems, LIMIT_KEYS)
    if fields is None:
        return _LIMITS
    return Limits(
        max_request_line=fields.get("max_request_line", size(positive=True), _LIMITS.max_request_line),
        max_header_size=fields.get("max_header_size", size(positive=True), _LIMITS.max_header_size),
        max_headers=fields.get("max_headers", integer(1), _LIMITS.max_headers),
        max_body_size=_max_body_size(fields),
        drain_timeout=fields.get("drain_timeout", duration(positive=False), _LIMITS.drain_timeout),
        escaped_slashes=fields.get("escaped_slashes", choice(ESCAPED_SLASHES, "mode"), _LIMITS.escaped_slashes),
    )


def _max_body_size(fields: Fields) -> int | None:
    if fields.raw.get("max_body_size") is None:
        return None  # null is the documented "unlimited": a value here, not a type error
    return fields.optional("max_body_size", size(positive=False))


def _rate_limit_service(top: Fields) -> RateLimitService | None:
    fields = top.section("rate_limit_service", RATE_LIMIT_SERVICE_KEYS)
    if fields is None:
        return None
    redis = fields.required("redis", address)
    timeout = fields.get("timeout", duration(positive=True), _RATE_LIMIT_SERVICE.timeout)
    prefix = fields.get("prefix", _prefix, _RATE_LIMIT_SERVICE.prefix)
    return RateLimitService(redis, timeout, prefix) if redis is not None else None
