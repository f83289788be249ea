"""Compile the ``clusters`` section: each entry becomes a frozen ``Cluster``, every problem recorded with its path.

A cluster gets its endpoints from exactly one source: a static ``endpoints`` list or ``discovery``, either DNS or the
config service's instance registry. The registry needs the config service's address and token, which only the
top-level ``config_service`` section gives: the caller says whether that section is there (``registry_available``).
Endpoint addresses are parsed once, here. The resilience settings (``circuit_breaker``, ``outlier_detection``,
``health_check``, ``retry_budget``) are checked for consistency (a maximum below its base, a check timeout above its
interval) so the runtime can trust them. A cluster's ``tls`` (TLS to its upstreams) is compiled by ``tls.py``, its
``mesh_identity`` (mesh mTLS to another meshgate) by ``mesh.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.config.mesh import mesh_identity
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
    not_above,
    not_below,
    number,
    string,
)
from gateway.config.snapshot import (
    LB_POLICIES,
    CircuitBreaker,
    Cluster,
    DnsDiscovery,
    EndpointSpec,
    HashOn,
    HealthCheck,
    OutlierDetection,
    RegistryDiscovery,
    RetryBudget,
)
from gateway.config.tls import UPSTREAM_TLS_KEYS, compile_upstream_tls, moved_into_tls
from gateway.config.values import quote

__all__ = ["ClusterSection", "compile_clusters"]

CLUSTER_KEYS = (
    "name",
    "endpoints",
    "discovery",
    "lb",
    "hash_on",
    "connect_timeout",
    "max_connections",
    "circuit_breaker",
    "outlier_detection",
    "health_check",
    "retry_budget",
    "tls",
    "mesh_identity",
)
ENDPOINT_KEYS = ("address", "weight")
DISCOVERY_KEYS = ("dns", "refresh", "registry")
BREAKER_KEYS = ("max_requests", "max_pending", "consecutive_failures", "open_for", "max_open_for")
OUTLIER_KEYS = ("consecutive_5xx", "base_ejection_time", "max_ejection_time", "max_ejection_percent")
HEALTH_CHECK_KEYS = ("path", "interval", "timeout", "unhealthy_threshold", "healthy_threshold", "panic_threshold")
RETRY_BUDGET_KEYS = ("ratio", "min_per_second", "window")

_DEFAULT = Cluster(name="")
_BREAKER = CircuitBreaker()
_OUTLIER = OutlierDetection()
_HEALTH_CHECK = HealthCheck()
_BUDGET = RetryBudget()
_DEFAULT_REFRESH = 5.0
_HASH_ON = re.compile(r"client|(?P<kind>header|cookie):(?P<name>[!#$%&'*+.^_`|~0-9A-Za-z-]+)")
_HASH_ON_HINT = "use client, header:<name> or cookie:<name>"
# The request target of a health check request: visible ASCII only, and no fragment (it is never sent).
_CHECK_PATH = re.compile(r"/[!-\"$-~]*")
_CHECK_PATH_HINT = 'percent-encode spaces and non-ASCII characters; no "#"'

_cluster_name = matching(NAME, "name", NAME_HINT)
# The registry is keyed by the service name a gateway's top-level `service` uses: the same alphabet, so a typo in
# case or punctuation is caught here instead of as a cluster that silently never gets an instance.
_SERVICE = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?")
_registry_service = matching(
    _SERVICE, "service name", 'use lower-case letters, digits, ".", "_", "-"; start and end with a letter or digit'
)
_lb = choice(LB_POLICIES, "policy")
_positive_duration = duration(positive=True)
_endpoint_weight = integer(1, 1000)
_max_connections = integer(1)
_at_least_one = integer(1)
_at_least_zero = integer(0)
_percent = integer(0, 100)
_ratio = number(0, 1)
_per_second = number(0)
_MIN_WINDOW = 1.0
_MOVED = moved_into_tls(UPSTREAM_TLS_KEYS)  # `server_name: ...` beside `tls` instead of inside it


@dataclass(slots=True)
class ClusterSection:
    """The compiled clusters by name (file order), and every declared name, including clusters with problems.

    ``names`` is ``None`` when the section is missing or not a list: route references cannot be checked then.
    """

    clusters: dict[str, Cluster] = field(default_factory=dict)
    names: list[str] | None = None


def compile_clusters(
    value: object, problems: Problems, *, registry_available: bool = False, trust_domain: str | None = None
) -> ClusterSection:
    """Compile the ``clusters`` list. ``registry_available``: the config has a ``config_service`` section, so
    ``discovery: {registry: ...}`` has a config service to ask (without one it is a problem, not a silent no-op).
    ``trust_domain``: the ``mesh`` section's, for ``mesh_identity`` (see ``mesh.mesh_identity``)."""
    entries = items(value, "clusters", problems, empty="must have at least one cluster")
    section = ClusterSection(names=[] if isinstance(value, list) else None)
    seen: dict[str, str] = {}
    for path, item in entries:
        fields = Fields.of(item, path, problems, CLUSTER_KEYS, (), _MOVED)
        if fields is not None:
            _declare(fields, section, seen, registry_available, trust_domain)
    return section


def _declare(
    fields: Fields, section: ClusterSection, seen: dict[str, str], registry_available: bool, trust_domain: str | None
) -> None:
    raw_name = fields.raw.get("name")
    if isinstance(raw_name, str) and section.names is not None:
        # Even an invalid name counts as declared: a route using it should not get a second, "unknown" problem.
        section.names.append(raw_name)
    name = fields.required("name", _cluster_name)
    if name is not None:
        first_use(name, fields.at("name"), fields.path, seen, fields.problems, "cluster name")
    cluster = _cluster(fields, name, registry_available, trust_domain)
    if cluster is not None and cluster.name not in section.clusters:
        section.clusters[cluster.name] = cluster


def _cluster(fields: Fields, name: str | None, registry_available: bool, trust_domain: str | None) -> Cluster | None:
    source = fields.exactly_one(("endpoints", "discovery"))
    endpoints = _endpoints(fields) if source == "endpoints" else ()
    dns, registry = _discovery(fields, registry_available) if source == "discovery" else (None, None)
    lb = fields.get("lb", _lb, _DEFAULT.lb)
    hash_on = _hash_on(fields, lb)
    connect_timeout = fields.get("connect_timeout", _positive_duration, _DEFAULT.connect_timeout)
    max_connections = fields.get("max_connections", _max_connections, _DEFAULT.max_connections)
    circuit_breaker = _circuit_breaker(fields)
    outlier_detection = _outlier_detection(fields)
    health_check = _health_check(fields)
    retry_budget = _retry_budget(fields)
    tls = compile_upstream_tls(fields)
    identity = mesh_identity(fields, trust_domain)
    if name is None or (not endpoints and dns is None and registry is None):
        return None  # already reported; the compiler raises before any Cluster is used
    return Cluster(
        name,
        endpoints,
        dns,
        lb,
        hash_on,
        connect_timeout,
        max_connections,
        circuit_breaker=circuit_breaker,
        outlier_detection=outlier_detection,
        health_check=health_check,
        retry_budget=retry_budget,
        registry=registry,
        tls=tls,
        mesh_identity=identity,
    )


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


def _discovery(cluster: Fields, registry_available: bool) -> tuple[DnsDiscovery | None, RegistryDiscovery | None]:
    fields = Fields.of(cluster.raw["discovery"], cluster.at("discovery"), cluster.problems, DISCOVERY_KEYS)
    if fields is None:
        return None, None
    kind = fields.exactly_one(("dns", "registry"))
    if kind == "registry":
        if fields.has("refresh"):
            # The registry is watched (long-poll), not polled: a refresh period would be a setting that does nothing.
            fields.problems.add(fields.at("refresh"), "only allowed with dns (the registry is watched, not polled)")
        service = fields.required("registry", _registry_service)
        if service is not None and not registry_available:
            fields.problems.add(fields.at("registry"), "needs a config_service section")
            return None, None
        return None, (RegistryDiscovery(service) if service is not None else None)
    if kind != "dns":
        return None, None  # none or both: already reported
    target = fields.required("dns", address)
    refresh = fields.get("refresh", _positive_duration, _DEFAULT_REFRESH)
    return (DnsDiscovery(target.host, target.port, refresh) if target is not None else None), None


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


def _circuit_breaker(cluster: Fields) -> CircuitBreaker:
    fields = cluster.section("circuit_breaker", BREAKER_KEYS)
    if fields is None:
        return _BREAKER
    max_requests = fields.get("max_requests", _at_least_one, _BREAKER.max_requests)
    max_pending = fields.get("max_pending", _at_least_one, _BREAKER.max_pending)
    consecutive_failures = fields.get("consecutive_failures", _at_least_zero, _BREAKER.consecutive_failures)
    mark = fields.problems.mark()
    open_for = fields.get("open_for", _positive_duration, _BREAKER.open_for)
    # Unset, the cap is the default or open_for, whichever is longer: raising only open_for is never an error.
    max_open_for = fields.get("max_open_for", _positive_duration, max(_BREAKER.max_open_for, open_for))
    if not fields.problems.since(mark):
        not_below(fields.at("max_open_for"), max_open_for, "open_for", open_for, fields.problems)
    return CircuitBreaker(max_requests, max_pending, consecutive_failures, open_for, max_open_for)


def _outlier_detection(cluster: Fields) -> OutlierDetection | None:
    fields = cluster.section("outlier_detection", OUTLIER_KEYS)
    if fields is None:
        return None
    consecutive_5xx = fields.get("consecutive_5xx", _at_least_one, _OUTLIER.consecutive_5xx)
    mark = fields.problems.mark()
    base = fields.get("base_ejection_time", _positive_duration, _OUTLIER.base_ejection_time)
    # As in Envoy: unset, the cap is 300s or the base ejection time, whichever is longer.
    maximum = fields.get("max_ejection_time", _positive_duration, max(_OUTLIER.max_ejection_time, base))
    if not fields.problems.since(mark):
        not_below(fields.at("max_ejection_time"), maximum, "base_ejection_time", base, fields.problems)
    percent = fields.get("max_ejection_percent", _percent, _OUTLIER.max_ejection_percent)
    return OutlierDetection(consecutive_5xx, base, maximum, percent)


def _health_check(cluster: Fields) -> HealthCheck | None:
    fields = cluster.section("health_check", HEALTH_CHECK_KEYS)
    if fields is None:
        return None
    path = fields.get("path", _check_path, _HEALTH_CHECK.path)
    mark = fields.problems.mark()
    interval = fields.get("interval", _positive_duration, _HEALTH_CHECK.interval)
    # Unset, the timeout shrinks with a short interval, so setting only the interval is never an error.
    timeout = fields.get("timeout", _positive_duration, min(_HEALTH_CHECK.timeout, interval))
    if not fields.problems.since(mark):
        # Checks of one endpoint never overlap: each is over (answered or timed out) before the next is due.
        not_above(fields.at("timeout"), timeout, "interval", interval, fields.problems)
    return HealthCheck(
        path=path,
        interval=interval,
        timeout=timeout,
        unhealthy_threshold=fields.get("unhealthy_threshold", _at_least_one, _HEALTH_CHECK.unhealthy_threshold),
        healthy_threshold=fields.get("healthy_threshold", _at_least_one, _HEALTH_CHECK.healthy_threshold),
        panic_threshold=fields.get("panic_threshold", _percent, _HEALTH_CHECK.panic_threshold),
    )


def _check_path(value: object, path: str, problems: Problems) -> str | None:
    text = string(value, path, problems)
    if text is None:
        return None
    if not text.startswith("/"):
        problems.add(path, 'must start with "/"')
        return None
    if _CHECK_PATH.fullmatch(text) is None:
        problems.add(path, f"invalid path {quote(text)} ({_CHECK_PATH_HINT})")
        return None
    return text


def _retry_budget(cluster: Fields) -> RetryBudget:
    fields = cluster.section("retry_budget", RETRY_BUDGET_KEYS)
    if fields is None:
        return _BUDGET
    ratio = fields.get("ratio", _ratio, _BUDGET.ratio)
    min_per_second = fields.get("min_per_second", _per_second, _BUDGET.min_per_second)
    window = fields.get("window", _positive_duration, _BUDGET.window)
    if window < _MIN_WINDOW:
        # Fewer than a second of history makes min_per_second meaningless and the ratio jumpy.
        fields.problems.add(fields.at("window"), "must be >= 1s")
        window = _BUDGET.window
    return RetryBudget(ratio, min_per_second, window)
