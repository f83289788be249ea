"""meshgate telemetry: structured logs and Prometheus metrics (traces arrive with the tracing module).

``gateway`` depends on this package, never the other way round. Entry points: ``telemetry.logging.configure`` and
``telemetry.metrics.Metrics``.
"""
