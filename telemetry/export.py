"""The span export path: OTLP over http/protobuf (default) or gRPC, always batched, never on the event loop.

``BatchSpanProcessor`` queues finished spans in memory (appending is all a request pays) and exports them from its
own thread; both OTLP exporters block while they send (the HTTP one through ``requests``), which is why a
``SimpleSpanProcessor`` is never used (it froze a test loop for 2 s). A full queue drops the newest spans instead of
waiting: a slow or dead collector costs traces, never requests. The gRPC exporter is imported only when chosen:
grpcio is a heavy import for a gateway that does not use it.
"""

from __future__ import annotations

import logging

from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from telemetry.settings import TracingSettings

__all__ = ["span_processor"]

# Spans per export request: the SDK default, capped by the queue so a small queue still exports.
_BATCH = 512


def span_processor(settings: TracingSettings) -> SpanProcessor:
    exporter: SpanExporter
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        # An http:// endpoint means plaintext (the Collector's and Jaeger's default 4317 listener).
        exporter = GrpcExporter(
            endpoint=settings.otlp_endpoint,
            insecure=settings.otlp_endpoint.startswith("http://"),
            timeout=settings.export_timeout,
        )
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        exporter = HttpExporter(endpoint=settings.otlp_endpoint, timeout=settings.export_timeout)
    # The SDK logs one warning per dropped span and per failed export; during a collector outage that would flood
    # the gateway's own log at request rate. Errors (a rejected batch) still come through.
    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
    logging.getLogger("opentelemetry.exporter.otlp").setLevel(logging.ERROR)
    return BatchSpanProcessor(
        exporter,
        max_queue_size=settings.max_queue,
        schedule_delay_millis=settings.batch_delay * 1000,
        max_export_batch_size=min(_BATCH, settings.max_queue),
        export_timeout_millis=settings.export_timeout * 1000,
    )
