"""meshgate telemetry: traces (OTLP), Prometheus metrics and structlog JSON logs, tied together by the trace id.

``gateway`` depends on this package, never the other way round. Entry points: ``telemetry.tracing.Tracer`` (spans,
sampling, propagation; exported through ``telemetry.export``), ``telemetry.metrics.Metrics`` (every metric family),
``telemetry.logging.configure`` (log lines, redaction) and ``telemetry.access_log.AccessLog``. Settings come as
plain data from ``telemetry.settings``.
"""
