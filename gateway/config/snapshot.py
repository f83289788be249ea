"""The compiled, immutable configuration a gateway serves from.

Everything here is plain frozen data produced once by ``compile.py``: regexes are compiled, durations are float
seconds, names are resolved, cumulative split weights are precomputed. The request path only reads it; a reload
builds a whole new ``Snapshot`` and swaps it in atomically (see ``store.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from policy.settings import AuthnSettings, AuthzSettings
from telemetry.settings import MetricSettings, TracingSettings

_METRICS = MetricSettings()  # frozen: one shared default
LogLevel = Literal["debug", "info", "warning", "error"]

__all__ = [
    "Address",
    "CircuitBreaker",
    "ConfigService",
    "Cluster",
    "Fallback",
    "FallbackResponse",
    "HealthCheck",
    "OutlierDetection",
    "RateLimit",
    "RateLimitKey",
    "RateLimitService",
    "RetryBudget",
    "RetryOn",
    "RetryPolicy",
    "RETRY_CONDITIONS",
    "DnsDiscovery",
    "RegistryDiscovery",
    "EndpointSpec",
    "HashOn",
    "HeaderMatch",
    "Limits",
    "LogLevel",
    "LogSettings",
    "MeshMode",
    "MeshSettings",
    "MESH_MODES",
    "LbPolicy",
    "ListenerTls",
    "Rewrite",
    "Route",
    "RouteMatch",
    "Snapshot",
    "TlsVersion",
    "UpstreamTls",
    "WeightedCluster",
    "LB_POLICIES",
]

LbPolicy = Literal["round_robin", "weighted_round_robin", "random", "least_request", "peak_ewma", "ring_hash"]
LB_POLICIES: tuple[LbPolicy, ...] = (
    "round_robin",
    "weighted_round_robin",
    "random",
    "least_request",
    "peak_ewma",
    "ring_hash",
)


@dataclass(frozen=True, slots=True)
class Address:
    """A ``host:port`` pair; ``host`` is kept as written (IPv6 without brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """One request-header condition. ``name`` is lower-case; exactly one kind applies."""

    name: str
    kind: Literal["exact", "prefix", "regex", "present"]
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.kind == "exact":
            return value == self.value
        if self.kind == "prefix":
            return value.startswith(self.value)
        if self.kind == "regex":
            assert self.pattern is not None
            return self.pattern.fullmatch(value) is not None
        return True  # present


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """Conditions of a route; all given ones must hold. At most one of the three path kinds is set."""

    path: str | None = None
    path_prefix: str | None = None
    path_regex: re.Pattern[str] | None = None
    methods: frozenset[str] | None = None  # upper-case; None = any
    host: str | None = None  # lower-case, no port; "*.example.com" matches one or more labels
    headers: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    cluster: str
    weight: int


@dataclass(frozen=True, slots=True)
class Rewrite:
    """``prefix`` replaces the matched ``path_prefix`` (or the whole ``path``); ``host`` replaces the Host header."""

    prefix: str | None = None
    host: str | None = None


RetryOn = Literal["connect-failure", "refused", "reset", "timeout"]
RETRY_CONDITIONS: tuple[RetryOn, ...] = ("connect-failure", "refused", "reset", "timeout")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Route retries. ``attempts`` counts every try, the first included (Envoy's num_retries + 1)."""

    attempts: int = 1
    per_try_timeout: float | None = None  # seconds; None = only the route deadline bounds a try
    on: frozenset[RetryOn] = frozenset({"connect-failure", "refused", "reset"})
    statuses: frozenset[int] = frozenset()  # response statuses that are retried, e.g. {502, 503, 504}
    backoff_base: float = 0.025
    backoff_max: float = 0.250
    non_idempotent: bool = False  # opt in to retrying POST/PATCH (and other non-idempotent methods)
    max_replay_body: int = 64 * 1024  # bytes of request body kept for replay; a larger body is sent once


RateLimitKey = Literal["principal", "client", "header", "route"]


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Token bucket per route and key: ``rps`` tokens per second, at most ``burst`` saved up."""

    rps: float
    burst: int
    key: RateLimitKey = "client"
    header: str = ""  # lower-case header name when key == "header"
    shared: bool = False  # count in Redis (``rate_limit_service``) across gateway replicas


@dataclass(frozen=True, slots=True)
class FallbackResponse:
    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Fallback:
    """What a route answers with when its cluster cannot: another cluster, or a static response."""

    cluster: str | None = None
    response: FallbackResponse | None = None


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    match: RouteMatch
    split: tuple[WeightedCluster, ...]  # one entry when the route names a single `cluster`
    cumulative_weights: tuple[int, ...]  # running sums of split weights, for bisect
    rewrite: Rewrite | None = None
    timeout: float | None = None  # seconds, whole request; None = no route deadline
    auth: Literal["required", "optional", "none"] = "required"
    retry: RetryPolicy = RetryPolicy()
    rate_limit: RateLimit | None = None
    fallback: Fallback | None = None

    @property
    def total_weight(self) -> int:
        return self.cumulative_weights[-1]


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    address: Address
    weight: int = 1


@dataclass(frozen=True, slots=True)
class DnsDiscovery:
    """Resolve ``host`` to every A/AAAA record every ``refresh`` seconds; each record becomes ``ip:port``."""

    host: str
    port: int
    refresh: float


@dataclass(frozen=True, slots=True)
class RegistryDiscovery:
    """Follow ``service``'s instances in the config service's registry; each instance's ``host:port`` is an endpoint.

    Where the config service is and how to authenticate to it is not here: that is the bootstrap's
    ``config_service`` section, turned into a client handle by the app and injected into the upstream runtimes.
    """

    service: str


@dataclass(frozen=True, slots=True)
class HashOn:
    """What ``ring_hash`` hashes: a request header, a cookie, or the client address."""

    kind: Literal["header", "cookie", "client"]
    name: str = ""  # header name (lower-case) or cookie name


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    """Both kinds of breaking (Envoy's thresholds, Linkerd's failure accrual)."""

    max_requests: int = 1024  # concurrent requests to the cluster; beyond -> 503 circuit_open at once
    max_pending: int = 1024  # requests waiting for a pooled connection; beyond -> 503 circuit_open at once
    consecutive_failures: int = 5  # per endpoint: trips its breaker (0 = never)
    open_for: float = 10.0  # first trip duration; doubles on each repeated trip (with jitter) ...
    max_open_for: float = 300.0  # ... up to this


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx: int = 5  # 5xx responses or gateway errors (connect failure, reset, timeout) in a row
    base_ejection_time: float = 30.0  # ejected for base x times-ejected
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 10  # never eject more than this share of the cluster (Envoy's default)


@dataclass(frozen=True, slots=True)
class HealthCheck:
    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 1.0
    unhealthy_threshold: int = 3
    healthy_threshold: int = 2
    panic_threshold: int = 50  # percent healthy below which health is ignored (Envoy's panic mode)


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """Retries allowed per cluster: ``ratio`` of recent requests plus ``min_per_second`` (Linkerd's budget)."""

    ratio: float = 0.2
    min_per_second: float = 10.0
    window: float = 10.0


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """A cluster's TLS to its upstreams (``https``). File paths are as written until ``resolve_paths`` makes them
    absolute; the files are read when the config is applied (``gateway/tls/contexts.py``), never here.

    ``ca_file`` ``None``: the system's trusted CAs. ``server_name``: the name sent as SNI and checked against the
    upstream certificate (endpoints are mostly IP addresses, which are checked against IP SANs otherwise).
    ``cert_file``/``key_file``: the client certificate presented (mTLS); both or neither.
    """

    ca_file: str | None = None
    server_name: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure_skip_verify: bool = False  # no certificate or name check at all: logged at every apply


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    endpoints: tuple[EndpointSpec, ...] = ()  # static list; empty when `dns` or `registry` is set
    dns: DnsDiscovery | None = None
    lb: LbPolicy = "round_robin"
    hash_on: HashOn = HashOn("client")
    connect_timeout: float = 1.0
    max_connections: int = 1024  # keep-alive pool size per cluster
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    outlier_detection: OutlierDetection | None = None
    health_check: HealthCheck | None = None
    retry_budget: RetryBudget = RetryBudget()
    # Last, not next to `dns`: Cluster is built positionally in places, and a new field must not shift the others.
    registry: RegistryDiscovery | None = None
    tls: UpstreamTls | None = None  # None: plain HTTP to the endpoints
    # Another meshgate's mesh identity (``spiffe://<trust domain>/service/<name>``): the endpoints are called over
    # mesh mTLS (the gateway's mesh certificate as client certificate, the mesh CAs as trust) and must present it.
    mesh_identity: str | None = None


TlsVersion = Literal["1.2", "1.3"]


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """TLS on the proxy listener. Turning it on or off needs a restart (the socket is bound once); new files or
    paths are loaded live, for new handshakes (see ``gateway/tls/reloader.py``).

    ``client_ca_file``: clients must present a certificate signed by one of these CAs (mTLS at the edge).
    """

    cert_file: str
    key_file: str
    min_version: TlsVersion = "1.2"
    client_ca_file: str | None = None


MeshMode = Literal["strict", "permissive", "disabled"]
MESH_MODES: tuple[MeshMode, ...] = ("strict", "permissive", "disabled")


@dataclass(frozen=True, slots=True)
class MeshSettings:
    """The top-level ``mesh`` section (bootstrap-only, restart-only): the gateway gets a mesh certificate from its
    config service, and its listener takes mesh mTLS in ``mtls`` mode, like Istio's PeerAuthentication:
    ``strict`` (mTLS required), ``permissive`` (mTLS or plain HTTP on the same port), ``disabled`` (plain HTTP; the
    certificate still serves the clusters with ``mesh_identity``)."""

    mtls: MeshMode = "strict"
    trust_domain: str = "meshgate.local"


@dataclass(frozen=True, slots=True)
class Limits:
    """Request limits enforced at the listener (400/413 replies)."""

    max_request_line: int = 8190
    max_header_size: int = 8190
    max_headers: int = 100
    max_body_size: int | None = None  # bytes; None = unlimited (bodies are streamed, never buffered)
    drain_timeout: float = 15.0
    escaped_slashes: Literal["unescape", "reject", "keep"] = "unescape"


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: LogLevel = "info"
    access_log: bool = True


@dataclass(frozen=True, slots=True)
class RateLimitService:
    """Redis for shared rate limits; unreachable -> each gateway falls back to its local bucket."""

    redis: Address
    timeout: float = 0.025
    prefix: str = "meshgate"


@dataclass(frozen=True, slots=True)
class ConfigService:
    """The bootstrap's ``config_service`` section: where the rest of the config comes from.

    ``token_file`` and ``cache_dir`` are resolved against the bootstrap file's directory when it is read;
    ``gateway_id`` ``None`` means ``<service>-<hostname>-<listen port>`` (stable across restarts).
    """

    url: str  # base URL, no trailing slash
    token_file: str
    cache_dir: str = ".meshgate-cache"
    gateway_id: str | None = None
    poll_wait: float = 30.0
    bundle_refresh: float = 5.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One validated configuration. ``routes`` is in file order (first match wins)."""

    service: str
    listen: Address
    admin: Address
    routes: tuple[Route, ...]
    clusters: Mapping[str, Cluster]
    limits: Limits = Limits()
    logs: LogSettings = LogSettings()
    tracing: TracingSettings | None = None  # None: nothing exported, new traces not sampled
    metrics: MetricSettings = _METRICS
    rate_limit_service: RateLimitService | None = None
    authn: AuthnSettings | None = None  # None: no token is verified, the principal is null
    authz: AuthzSettings | None = None  # None: no policy decision is made
    config_service: ConfigService | None = None  # None: everything comes from this file
    tls: ListenerTls | None = None  # None: plain HTTP on the listener
    mesh: MeshSettings | None = None  # None: no mesh certificate, no mesh mTLS
    # Provenance, for /config and the reload log.
    version: int = 0
    source: str = ""
    hash: str = ""
    loaded_at: float = 0.0
    document: Mapping[str, Any] = field(default_factory=dict)  # the decoded config, secrets redacted
