"""Compile the ``clusters`` section: each entry becomes a frozen ``Cluster``, every problem recorded with its path.

A cluster gets its endpoints from exactly one source: a static ``endpoints`` list or ``discovery`` (DNS here; the
registry comes with the config service). Endpoint addresses are parsed once, here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.config.schema import (
    NAME,
    NAME_HINT,
    Fields,
    Problems,
    address,
    choice,
    describe,
    duration,
    first_use,
    integer,
    items,
    matching,
    string,
)
from gateway.config.snapshot import LB_POLICIES, Cluster, DnsDiscovery, EndpointSpec, HashOn
from gateway.config.values import quote

__all__ = ["ClusterSection", "compile_clusters"]

CLUSTER_KEYS = ("name", "endpoints", "discovery", "lb", "hash_on", "connect_timeout", "max_connections")
CLUSTER_UNSUPPORTED = ("circuit_breaker", "outlier_detection", "health_check", "tls", "mesh_identity")
ENDPOINT_KEYS = ("address", "weight")
DISCOVERY_KEYS = ("dns", "refresh")
DISCOVERY_UNSUPPORTED = ("registry",)

_DEFAULT = Cluster(name="")
_DEFAULT_REFRESH = 5.0
_HASH_ON = re.compile(r"client|(?P<kind>header|cookie):(?P<name>[!#$%&'*+.^_`|~0-9A-Za-z-]+)")
_HASH_ON_HINT = "use client, header:<name> or cookie:<name>"

_cluster_name = matching(NAME, "name", NAME_HINT)
_lb = choice(LB_POLICIES, "policy")
_positive_duration = duration(positive=True)
_endpoint_weight = integer(1, 1000)
_max_connections = integer(1)


@dataclass(slots=True)
class ClusterSection:
    """The compiled clusters by name (file order), and every declared name, including clusters with problems.

    ``names`` is ``None`` when the section is missing or not a list: route references cannot be checked then.
    """

    clusters: dict[str, Cluster] = field(default_factory=dict)
    names: list[str] | None = None


def compile_clusters(value: object, problems: Problems) -> ClusterSection:
    entries = items(value, "clusters", problems, empty="must have at least one cluster")
    section = ClusterSection(names=[] if isinstance(value, list) else None)
    seen: dict[str, str] = {}
    for path, item in entries:
        fields = Fields.of(item, path, problems, CLUSTER_KEYS, CLUSTER_UNSUPPORTED)
        if fields is not None:
            _declare(fields, section, seen)
    return section


def _declare(fields: Fields, section: ClusterSection, seen: dict[str, str]) -> None:
    raw_name = fields.raw.get("name")
    if isinstance(raw_name, str) and section.names is not None:
        # Even an invalid name counts as declared: a route using it should not get a second, "unknown" problem.
        section.names.append(raw_name)
    name = fields.required("name", _cluster_name)
    if name is not None:
        first_use(name, fields.at("name"), fields.path, seen, fields.problems, "cluster name")
    cluster = _cluster(fields, name)
    if cluster is not None and cluster.name not in section.clusters:
        section.clusters[cluster.name] = cluster


def _cluster(fields: Fields, name: str | None) -> Cluster | None:
    source = fields.exactly_one(("endpoints", "discovery"))
    endpoints = _endpoints(fields) if source == "endpoints" else ()
    dns = _discovery(fields) if source == "discovery" else None
    lb = fields.get("lb", _lb, _DEFAULT.lb)
    hash_on = _hash_on(fields, lb)
    connect_timeout = fields.get("connect_timeout", _positive_duration, _DEFAULT.connect_timeout)
    max_connections = fields.get("max_connections", _max_connections, _DEFAULT.max_connections)
    if name is None or (not endpoints and dns is None):
        return None  # already reported; the compiler raises before any Cluster is used
    return Cluster(name, endpoints, dns, lb, hash_on, connect_timeout, max_connections)


def _endpoints(cluster: Fields) -> tuple[EndpointSpec, ...]:
    problems = cluster.problems
    seen: dict[str, str] = {}
    endpoints: list[EndpointSpec] = []
    entries = items(
        cluster.raw["endpoints"], cluster.at("endpoints"), problems, empty="must have at least one endpoint"
    )
    for path, entry in entries:
        endpoint = _endpoint(entry, path, problems)
        if endpoint is not None:
            # Host names are case-insensitive; "LOCALHOST:80" and "localhost:80" are the same endpoint.
            key = str(endpoint.address).lower()
            first_use(key, path, path, seen, problems, "endpoint")
            endpoints.append(endpoint)
    return tuple(endpoints) if len(endpoints) == len(entries) else ()


def _endpoint(entry: object, path: str, problems: Problems) -> EndpointSpec | None:
    if isinstance(entry, str):
        parsed = address(entry, path, problems)
        return EndpointSpec(parsed) if parsed is not None else None
    if not isinstance(entry, Mapping):
        problems.add(path, f"expected an address string or a mapping, got {describe(entry)}")
        return None
    fields = Fields(entry, path, problems, ENDPOINT_KEYS)
    parsed = fields.required("address", address)
    weight = fields.get("weight", _endpoint_weight, 1)
    return EndpointSpec(parsed, weight) if parsed is not None else None


def _discovery(cluster: Fields) -> DnsDiscovery | None:
    fields = Fields.of(
        cluster.raw["discovery"], cluster.at("discovery"), cluster.problems, DISCOVERY_KEYS, DISCOVERY_UNSUPPORTED
    )
    if fields is None:
        return None
    if "registry" in fields.raw:
        return None  # reported as not supported; "dns: required" on top of it would only confuse
    target = fields.required("dns", address)
    refresh = fields.get("refresh", _positive_duration, _DEFAULT_REFRESH)
    return DnsDiscovery(target.host, target.port, refresh) if target is not None else None


def _hash_on(cluster: Fields, lb: str) -> HashOn:
    text = cluster.optional("hash_on", string)
    if text is None:
        return _DEFAULT.hash_on
    path = cluster.at("hash_on")
    if lb != "ring_hash":
        # Every other policy ignores the hash key; accepting it would hide a config that does not do what it says.
        cluster.problems.add(path, "only allowed with lb: ring_hash")
        return _DEFAULT.hash_on
    match = _HASH_ON.fullmatch(text)
    if match is None:
        cluster.problems.add(path, f"invalid value {quote(text)} ({_HASH_ON_HINT})")
        return _DEFAULT.hash_on
    if match["kind"] == "header":
        return HashOn("header", match["name"].lower())
    if match["kind"] == "cookie":
        return HashOn("cookie", match["name"])  # cookie names are case-sensitive
    return HashOn("client")
