"""The ``telemetry`` section: logs, tracing (OTLP export, sampling, propagation) and metrics settings.

Pure, like the rest of the compiler. The settings types live in ``telemetry.settings`` (the telemetry package may not
import the gateway); this module only decodes and checks the document into them.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.config.schema import Fields, Problems, boolean, choice, duration, integer, items, number, string
from gateway.config.snapshot import LogLevel, LogSettings
from telemetry.settings import PROPAGATORS, PROTOCOLS, MetricSettings, Propagator, Protocol, TracingSettings

__all__ = ["LOG_LEVELS", "TelemetrySection", "compile_telemetry"]

TELEMETRY_KEYS = ("logs", "tracing", "metrics")
LOG_KEYS = ("level", "access_log")
TRACING_KEYS = (
    "otlp_endpoint",
    "protocol",
    "sample_ratio",
    "max_traces_per_second",
    "propagators",
    "batch",
)
BATCH_KEYS = ("max_queue", "delay", "export_timeout")
METRIC_KEYS = ("exemplars",)
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
TRACES_PATH = "/v1/traces"

_LOGS = LogSettings()
_METRICS = MetricSettings()


@dataclass(frozen=True, slots=True)
class TelemetrySection:
    logs: LogSettings = _LOGS
    tracing: TracingSettings | None = None
    metrics: MetricSettings = _METRICS


def compile_telemetry(top: Fields) -> TelemetrySection:
    telemetry = top.section("telemetry", TELEMETRY_KEYS)
    if telemetry is None:
        return TelemetrySection()
    return TelemetrySection(_logs(telemetry), _tracing(telemetry), _metrics(telemetry))


def _logs(telemetry: Fields) -> LogSettings:
    fields = telemetry.section("logs", LOG_KEYS)
    if fields is None:
        return _LOGS
    return LogSettings(
        level=fields.get("level", choice(LOG_LEVELS, "level"), _LOGS.level),
        access_log=fields.get("access_log", boolean, _LOGS.access_log),
    )


def _metrics(telemetry: Fields) -> MetricSettings:
    fields = telemetry.section("metrics", METRIC_KEYS)
    if fields is None:
        return _METRICS
    return MetricSettings(exemplars=fields.get("exemplars", boolean, _METRICS.exemplars))


def _tracing(telemetry: Fields) -> TracingSettings | None:
    fields = telemetry.section("tracing", TRACING_KEYS)
    if fields is None:
        return None
    mark = fields.problems.mark()
    protocol: Protocol = fields.get("protocol", choice(PROTOCOLS, "protocol"), "http/protobuf")
    raw_endpoint = fields.required("otlp_endpoint", string)
    endpoint = _endpoint(raw_endpoint, protocol, fields.at("otlp_endpoint"), fields.problems) if raw_endpoint else None
    defaults = TracingSettings("")
    ratio = fields.get("sample_ratio", number(0.0, 1.0), defaults.sample_ratio)
    # null is the documented "no cap", as for limits.max_body_size: a value, not a type error.
    capped = fields.raw.get("max_traces_per_second") is not None
    cap = fields.optional("max_traces_per_second", number(0.0, positive=True)) if capped else None
    propagators = _propagators(fields) or defaults.propagators
    batch = fields.section("batch", BATCH_KEYS)
    max_queue, delay, timeout = defaults.max_queue, defaults.batch_delay, defaults.export_timeout
    if batch is not None:
        max_queue = batch.get("max_queue", integer(1, 1_000_000), max_queue)
        delay = batch.get("delay", duration(positive=True), delay)
        timeout = batch.get("export_timeout", duration(positive=True), timeout)
    if endpoint is None or fields.problems.since(mark):
        return None
    return TracingSettings(
        otlp_endpoint=endpoint,
        protocol=protocol,
        sample_ratio=ratio,
        max_traces_per_second=cap,
        propagators=propagators,
        max_queue=max_queue,
        batch_delay=delay,
        export_timeout=timeout,
    )


def _endpoint(value: str, protocol: str, path: str, problems: Problems) -> str | None:
    """http/protobuf: a base URL gets ``/v1/traces`` (as ``OTEL_EXPORTER_OTLP_ENDPOINT`` does); grpc: as given."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        problems.add(path, f'expected an http:// or https:// URL like "http://127.0.0.1:4318", got "{value}"')
        return None
    if parts.username is not None or parts.password is not None:
        # It would be shown by /config and logged; OTLP credentials travel in headers, not in the URL.
        problems.add(path, "must not carry credentials (set OTEL_EXPORTER_OTLP_TRACES_HEADERS instead)")
        return None
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        problems.add(path, f'bad port in "{value}"')
        return None
    if protocol == "grpc":
        if parts.path not in ("", "/"):
            problems.add(path, "a gRPC endpoint has no path (host and port only)")
            return None
        return value.rstrip("/")
    if parts.path.rstrip("/").endswith(TRACES_PATH):
        return value
    return value.rstrip("/") + TRACES_PATH


def _propagators(fields: Fields) -> tuple[Propagator, ...] | None:
    if not fields.has("propagators"):
        return None
    mark = fields.problems.mark()
    decode = choice(PROPAGATORS, "propagator")
    chosen: list[Propagator] = []
    listed = items(fields.raw["propagators"], fields.at("propagators"), fields.problems, empty="must not be empty")
    for item_path, value in listed:
        name = decode(value, item_path, fields.problems)
        if name is None:
            continue
        if name in chosen:
            fields.problems.add(item_path, f'"{name}" is listed twice')
        chosen.append(name)
    if fields.problems.since(mark):
        return None
    if "tracecontext" not in chosen:
        # The contract: W3C traceparent always travels; B3 is in addition, never instead.
        fields.problems.add(fields.at("propagators"), '"tracecontext" is always on: list it with the others')
        return None
    return tuple(chosen)
