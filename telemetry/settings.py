"""Telemetry settings as plain frozen data: what the config file's ``telemetry`` section compiles to.

Declared here, not in ``gateway.config``, because ``telemetry`` must not import ``gateway`` (dependencies point one
way); the gateway's config compiler builds these values and the tracer consumes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["PROPAGATORS", "PROTOCOLS", "MetricSettings", "Propagator", "Protocol", "TracingSettings"]

Protocol = Literal["http/protobuf", "grpc"]
Propagator = Literal["tracecontext", "baggage", "b3", "b3multi"]
PROTOCOLS: tuple[Protocol, ...] = ("http/protobuf", "grpc")
PROPAGATORS: tuple[Propagator, ...] = ("tracecontext", "baggage", "b3", "b3multi")


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """Where and how spans are exported, which new traces are sampled, which headers carry the context."""

    otlp_endpoint: str  # http/protobuf: the full traces URL (the compiler appends ``/v1/traces``); grpc: http(s)://h:p
    protocol: Protocol = "http/protobuf"
    sample_ratio: float = 1.0  # share of new (root) traces recorded; a sampled parent is always followed
    max_traces_per_second: float | None = None  # cap on new sampled traces per second; None = no cap
    propagators: tuple[Propagator, ...] = ("tracecontext", "baggage")
    max_queue: int = 2048  # spans waiting for export; beyond it the newest are dropped (never block a request)
    batch_delay: float = 0.2  # seconds between exports when the batch is not full
    export_timeout: float = 10.0  # per export call, in the exporter's own thread


@dataclass(frozen=True, slots=True)
class MetricSettings:
    exemplars: bool = True  # trace ids of sampled requests on latency histogram buckets (OpenMetrics scrapes)
