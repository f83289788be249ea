"""Every Prometheus family meshgate exports, declared in one place (this is what dashboards query).

Label values are bounded: route names (``unmatched`` when none), cluster names, endpoint addresses from config or
discovery, status codes, reason codes. Never a raw path, user, client address or id. Each gateway process owns one
``Metrics`` on its own registry, served by the admin port. State that already lives elsewhere (breaker states,
endpoint health) is read at scrape time through ``StateGauges`` instead of being mirrored on every change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "AUTHZ_BUCKETS",
    "DENIAL_REASONS",
    "DURATION_BUCKETS",
    "PUSH_TO_APPLIED_BUCKETS",
    "CappedLabel",
    "ConfigServiceMetrics",
    "Labelled",
    "Metrics",
    "StateRow",
]

# OpenTelemetry semantic-convention bucket advice for http.*.request.duration, in seconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

# A policy decision takes microseconds in-process and milliseconds over the network: finer at the low end.
AUTHZ_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

# (label values, value) for one sample of a scrape-time gauge.
StateRow = tuple[Sequence[str], float]


M = TypeVar("M", Counter, Gauge, Histogram)


class Labelled(Generic[M]):
    """A metric family whose labelled children are cached by label values.

    ``family.labels(...)`` costs a few microseconds (argument checks, a lock, a dict of strings); the gateway asks
    for the same few children on every request, so they are looked up once in a tuple-keyed dict instead. The
    label values are bounded (see the module docstring), so the cache is too.
    """

    __slots__ = ("_children", "family")

    def __init__(self, family: M) -> None:
        self.family: M = family
        self._children: dict[tuple[str, ...], M] = {}

    def labels(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.family.labels(*values)
        return child


# A policy's deny reason is text its author writes: bounded in practice (one per rule), not by construction. A
# policy that put a user name or a path in its reason would otherwise grow a series per request.
DENIAL_REASONS = 50
OTHER = "other"
REASON_CHARS = 120


class CappedLabel:
    """``http_route`` x a free-text ``reason`` counter that keeps at most ``cap`` distinct reasons: later ones are
    counted under ``other`` (Envoy does the same for stat tags it cannot bound)."""

    __slots__ = ("_cap", "_children", "_reasons", "family")

    def __init__(self, family: Counter, cap: int) -> None:
        self.family = family
        self._cap = cap
        self._reasons: set[str] = set()
        self._children: dict[tuple[str, str], Counter] = {}

    def inc(self, route: str, reason: str) -> None:
        label = reason[:REASON_CHARS] or "unspecified"
        if label not in self._reasons:
            if len(self._reasons) >= self._cap:
                label = OTHER
            else:
                self._reasons.add(label)
        # Keyed by the label, never the raw reason: the cache holds at most (routes x (cap + 1)) children, whatever
        # a policy puts in its reasons.
        child = self._children.get((route, label))
        if child is None:
            child = self._children[(route, label)] = self.family.labels(route, label)
        child.inc()


class Metrics:
    """The metric families; one instance per process, passed to the stages that record into it."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.server_duration = Labelled(
            Histogram(
                "http_server_request_duration_seconds",
                "Duration of HTTP server requests handled by the gateway.",
                ["http_request_method", "http_route", "http_response_status_code"],
                buckets=DURATION_BUCKETS,
                registry=r,
            )
        )
        self.client_duration = Labelled(
            Histogram(
                "http_client_request_duration_seconds",
                "Duration of each upstream attempt, until the response headers (or the error).",
                ["http_request_method", "upstream", "http_response_status_code", "error_type"],
                buckets=DURATION_BUCKETS,
                registry=r,
            )
        )
        self.active_requests = Gauge(
            "http_server_active_requests", "Requests the gateway is handling right now.", registry=r
        )
        self.local_replies = Labelled(
            Counter(
                "meshgate_local_replies_total",
                "Replies the gateway made itself instead of the upstream, by reason code.",
                ["http_route", "reason"],
                registry=r,
            )
        )
        self.config_version = Gauge("meshgate_config_version", "Version of the config being served.", registry=r)
        self.config_reloads = Labelled(
            Counter("meshgate_config_reloads_total", "Config reload attempts by result.", ["result"], registry=r)
        )
        for result in ("applied", "rejected"):
            # Exported at 0 from the start: rate() and increase() cannot count a counter's first sample, so the
            # first rejected config would otherwise never show on a dashboard.
            self.config_reloads.labels(result)
        # Resilience.
        self.retries = Labelled(
            Counter("meshgate_upstream_retries_total", "Upstream attempts beyond the first.", ["upstream"], registry=r)
        )
        self.retry_budget_exhausted = Labelled(
            Counter(
                "meshgate_retry_budget_exhausted_total",
                "Retries not made because the cluster's retry budget was spent.",
                ["upstream"],
                registry=r,
            )
        )
        self.outlier_ejections = Labelled(
            Counter(
                "meshgate_outlier_ejections_total", "Endpoints ejected by outlier detection.", ["upstream"], registry=r
            )
        )
        self.ratelimit_rejections = Labelled(
            Counter(
                "meshgate_ratelimit_rejections_total", "Requests refused by a rate limit.", ["http_route"], registry=r
            )
        )
        self.ratelimit_fallbacks = Labelled(
            Counter(
                "meshgate_ratelimit_redis_fallbacks_total",
                "Shared rate-limit decisions taken by the local bucket because Redis was unreachable.",
                ["http_route"],
                registry=r,
            )
        )
        # Policy (authn/authz). Declared with the rest so dashboards and alerts can be written against the full
        # set; they get samples once a gateway has authn/authz configured.
        self.authz_decisions = Labelled(
            Counter(
                "meshgate_authz_decisions_total",
                "Authorization decisions by outcome and decision-cache use.",
                ["http_route", "decision", "cache"],
                registry=r,
            )
        )
        self.authz_denials = CappedLabel(
            Counter(
                "meshgate_authz_denials_total",
                "Requests the policy denied, by route and the policy's own reason (its first "
                f"{DENIAL_REASONS} distinct reasons per process; later ones count as {OTHER!r}).",
                ["http_route", "reason"],
                registry=r,
            ),
            DENIAL_REASONS,
        )
        self.authz_duration = Labelled(
            Histogram(
                "meshgate_authz_duration_seconds",
                "Time to reach an authorization decision (cache, embedded Rego or the OPA server).",
                ["engine"],
                buckets=AUTHZ_BUCKETS,
                registry=r,
            )
        )
        self.authz_shadow_decisions = Labelled(
            Counter(
                "meshgate_authz_shadow_decisions_total",
                "Decisions of the shadow policy (evaluated on every request, never enforced), by outcome "
                "(allow, deny, error; skipped when too many were still in flight).",
                ["http_route", "decision"],
                registry=r,
            )
        )
        self.authz_shadow_disagreements = Labelled(
            Counter(
                "meshgate_authz_shadow_disagreements_total",
                "Requests the shadow policy decided differently from the enforced one (allow vs deny vs error).",
                ["http_route"],
                registry=r,
            )
        )
        self.authn_failures = Labelled(
            Counter(
                "meshgate_authn_failures_total",
                "Requests refused by authentication, by reason.",
                ["reason"],
                registry=r,
            )
        )
        self.fallbacks = Labelled(
            Counter(
                "meshgate_fallbacks_total",
                "Requests answered by a route's fallback (cluster or static response).",
                ["http_route", "kind"],
                registry=r,
            )
        )

    def bundle_revisions(self, rows: Callable[[], Iterable[StateRow]]) -> None:
        """Register ``meshgate_authz_bundle_info{policy, revision}``: 1 per loaded policy (``primary``,
        ``shadow``), read at scrape time so a bundle reload shows at once and the old revision's series goes."""
        self.registry.register(
            _StateGauges(
                (
                    (
                        "meshgate_authz_bundle_info",
                        "1 for each policy the gateway decides with, labelled with its bundle revision.",
                        ("policy", "revision"),
                        rows,
                    ),
                )
            )
        )

    def log_drops(self, dropped: Callable[[], int]) -> None:
        """Register ``meshgate_log_lines_dropped_total``, read at scrape time from the log writer's own count."""
        self.registry.register(
            _ScrapeCounter(
                "meshgate_log_lines_dropped",
                "Log lines dropped because stdout did not keep up (the request went on; its line did not).",
                (),
                lambda: [((), dropped())],
            )
        )

    def span_counts(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Register ``meshgate_tracing_spans_total{result}``: spans exported, dropped (queue full) or failed."""
        self.registry.register(
            _ScrapeCounter(
                "meshgate_tracing_spans",
                "Finished spans by what became of them: exported, dropped (export queue full), failed (not accepted).",
                ("result",),
                lambda: [((result,), value) for result, value in counts().items()],
            )
        )

    def state_gauges(
        self,
        breaker_states: Callable[[], Iterable[StateRow]],
        endpoint_states: Callable[[], Iterable[StateRow]],
    ) -> None:
        """Register the scrape-time gauges; the callables read the live upstream state."""
        self.registry.register(
            _StateGauges(
                (
                    (
                        "meshgate_circuit_breaker_state",
                        "Per-endpoint breaker: 0 closed, 1 tripped, 2 probing.",
                        ("upstream", "endpoint"),
                        breaker_states,
                    ),
                    (
                        "meshgate_upstream_endpoints",
                        "Endpoints per upstream cluster by state.",
                        ("upstream", "state"),
                        endpoint_states,
                    ),
                )
            )
        )


class _ScrapeCounter(Collector):
    """A counter whose values live elsewhere (prometheus-client counters cannot read a function, gauges can)."""

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], rows: Callable[[], Iterable[StateRow]]
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = list(labels)
        self._rows = rows

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labels)
        for values, value in self._rows():
            family.add_metric(list(values), value)
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._documentation, labels=self._labels)


class _StateGauges(Collector):
    def __init__(self, families: Sequence[tuple[str, str, Sequence[str], Callable[[], Iterable[StateRow]]]]) -> None:
        self._families = families

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for name, documentation, labels, rows in self._families:
            family = GaugeMetricFamily(name, documentation, labels=list(labels))
            for values, value in rows():
                family.add_metric(list(values), value)
            yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for name, documentation, labels, _rows in self._families:
            yield GaugeMetricFamily(name, documentation, labels=list(labels))


# The config service answers long-polls that last up to a minute; the rest of its calls take milliseconds. Rollout
# latency (push to applied by a gateway) runs from well under a second to minutes when a gateway is down.
PUSH_TO_APPLIED_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


class ConfigServiceMetrics:
    """The families of ``meshgate configservice`` (the control plane), on its own registry, served at its
    ``/metrics``. Labels: ``route`` is the API route template (``/v1/services/{service}/config``, ``unmatched``),
    never the raw path; ``service``, ``gateway`` and bundle ``name`` are bounded by the fleet the operator runs."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Labelled(
            Counter(
                "meshgate_configservice_requests_total",
                "API calls answered, by route template and status code.",
                ["route", "code"],
                registry=r,
            )
        )
        self.pushes = Labelled(
            Counter(
                "meshgate_configservice_pushes_total",
                "Config pushes and rollbacks by result: created (a new version), unchanged (same content as the "
                "latest: no version), rejected (invalid: nothing stored).",
                ["service", "result"],
                registry=r,
            )
        )
        self.latest_version = Labelled(
            Gauge(
                "meshgate_configservice_latest_version", "Latest config version per service.", ["service"], registry=r
            )
        )
        self.applied_version = Labelled(
            Gauge(
                "meshgate_configservice_gateway_applied_version",
                "The config version each polling gateway last reported as applied.",
                ["service", "gateway"],
                registry=r,
            )
        )
        self.push_to_applied = Histogram(
            "meshgate_configservice_push_to_applied_seconds",
            "From a version's creation to a gateway first reporting it applied (one sample per gateway and version).",
            buckets=PUSH_TO_APPLIED_BUCKETS,
            registry=r,
        )
        self.watchers = Gauge(
            "meshgate_configservice_watchers", "Long-polls parked right now (configs and instance lists).", registry=r
        )
        self.certificates_issued = Labelled(
            Counter(
                "meshgate_configservice_certificates_issued_total",
                "Mesh certificates signed by the config service's CA, by the service they identify.",
                ["service"],
                registry=r,
            )
        )
        # Not cached through Labelled: a bundle's old revision series is removed when a new one is stored.
        self.bundle_info = Gauge(
            "meshgate_configservice_bundle_info",
            "1 for each stored policy bundle, labelled with its current revision.",
            ["name", "revision"],
            registry=r,
        )

    def bundle_stored(self, name: str, revision: str, previous: str | None) -> None:
        """Move ``bundle_info{name}`` to ``revision`` (the old revision's series goes, it is not 0 forever)."""
        if previous is not None and previous != revision:
            # KeyError: never exported by this process (stored before it started).
            with contextlib.suppress(KeyError):
                self.bundle_info.remove(name, previous)
        self.bundle_info.labels(name, revision).set(1)
