"""Every Prometheus family meshgate exports, declared in one place (this is what dashboards query).

Label values are bounded: route names (``unmatched`` when none), cluster names, status codes, reason codes. Never a
raw path, user, address or id. Each gateway process owns one ``Metrics`` on its own registry, served by the admin
port.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["DURATION_BUCKETS", "Metrics"]

# OpenTelemetry semantic-convention bucket advice for http.*.request.duration, in seconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class Metrics:
    """The metric families; one instance per process, passed to the stages that record into it."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.server_duration = Histogram(
            "http_server_request_duration_seconds",
            "Duration of HTTP server requests handled by the gateway.",
            ["http_request_method", "http_route", "http_response_status_code"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.client_duration = Histogram(
            "http_client_request_duration_seconds",
            "Duration of each upstream attempt, until the response headers (or the error).",
            ["http_request_method", "upstream", "http_response_status_code", "error_type"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.active_requests = Gauge(
            "http_server_active_requests", "Requests the gateway is handling right now.", registry=r
        )
        self.local_replies = Counter(
            "meshgate_local_replies_total",
            "Replies the gateway made itself instead of the upstream, by reason code.",
            ["http_route", "reason"],
            registry=r,
        )
        self.config_version = Gauge("meshgate_config_version", "Version of the config being served.", registry=r)
        self.config_reloads = Counter(
            "meshgate_config_reloads_total", "Config reload attempts by result.", ["result"], registry=r
        )
