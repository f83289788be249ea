"""The span export path: a bounded in-memory batch, a background thread, OTLP over http/protobuf or gRPC.

A request's only cost is appending its finished spans to a deque (``SpanBatcher.add``). A daemon thread wakes every
``batch_delay`` (or as soon as a full batch waits), encodes the batch (``telemetry.otlp``) and sends it with the
OpenTelemetry OTLP exporters' own transports, which block while they send and retry transient failures within the
export timeout: that is why none of it runs on the event loop (a synchronous export froze a test loop for 2 s). A full
queue drops new spans instead of waiting, and counts them: a slow or dead collector costs traces, never requests.

The exporters are used for their transport only: the HTTP one through its client's ``export(bytes)`` and the gRPC
one through ``_translate_data``, its documented override point for turning a batch into the request message. Both
are pinned with the SDK (1.45.1).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from telemetry.otlp import encode_request
from telemetry.settings import TracingSettings

if TYPE_CHECKING:
    from telemetry.tracing import Span

__all__ = ["Sender", "SpanBatcher", "span_batcher"]

log = logging.getLogger("meshgate.tracing")

# Spans per export request (the SDK's default batch size).
BATCH = 512


class Sender(Protocol):
    """Sends one encoded ``ExportTraceServiceRequest``; True on success. Blocking: runs in the export thread."""

    def send(self, payload: bytes, count: int) -> bool: ...

    def close(self) -> None: ...


class SpanBatcher:
    """Queue finished spans; export them in batches from a thread of its own. Counts what it exported, dropped and
    failed to deliver (``meshgate_tracing_spans_total``)."""

    def __init__(
        self,
        sender: Sender,
        encode: Callable[[Sequence[Span]], bytes],
        *,
        max_queue: int,
        delay: float,
        batch: int = BATCH,
    ) -> None:
        self._sender = sender
        self._encode = encode
        self._max_queue = max_queue
        self._delay = delay
        self._batch = min(batch, max_queue)
        self._queue: deque[Span] = deque()
        self._wake = threading.Event()
        self._idle = threading.Event()  # set whenever the queue is empty and nothing is being sent
        self._idle.set()
        self._stopping = False
        self.exported = 0
        self.dropped = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="meshgate-span-export", daemon=True)
        self._thread.start()

    def add(self, span: Span) -> None:
        """Called on the event loop for every finished recording span: an append, and rarely a wake-up."""
        queue = self._queue
        if len(queue) >= self._max_queue or self._stopping:
            self.dropped += 1
            return
        queue.append(span)
        self._idle.clear()
        if len(queue) == self._batch:
            self._wake.set()  # a full batch waits: send now rather than at the next tick

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until everything queued so far was sent (or failed). Blocking."""
        self._wake.set()
        return self._idle.wait(timeout)

    def shutdown(self, timeout: float) -> None:
        """Send what is queued within ``timeout`` s, then stop; a send still stuck ends with the process (daemon)."""
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        self._stopping = True
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if not self._thread.is_alive():
            self._sender.close()

    def _run(self) -> None:
        queue = self._queue
        while True:
            self._wake.wait(self._delay)
            self._wake.clear()
            while queue:
                batch = [queue.popleft() for _ in range(min(self._batch, len(queue)))]
                self._send(batch)
            self._idle.set()
            if self._stopping:
                return

    def _send(self, batch: list[Span]) -> None:
        try:
            delivered = self._sender.send(self._encode(batch), len(batch))
        except Exception:  # a bug or an unexpected transport error must not kill the export thread
            log.exception("span_export_error")
            delivered = False
        if delivered:
            self.exported += len(batch)
        else:
            self.failed += len(batch)


class _HttpSender:
    def __init__(self, settings: TracingSettings) -> None:
        import requests
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # trust_env off: requests otherwise re-reads ~/.netrc and the proxy variables on every POST (13% of the
        # export thread in a profile); the collector's address comes from the config, not the environment.
        session = requests.Session()
        session.trust_env = False
        self._exporter = OTLPSpanExporter(
            endpoint=settings.otlp_endpoint, timeout=settings.export_timeout, session=session
        )

    def send(self, payload: bytes, count: int) -> bool:
        return bool(self._exporter._client.export(payload).success)

    def close(self) -> None:
        self._exporter.shutdown()  # type: ignore[no-untyped-call]


def _grpc_sender(settings: TracingSettings) -> Sender:
    # Imported only when chosen: grpcio is a heavy import for a gateway that does not use it.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.sdk.trace.export import SpanExportResult

    class Exporter(OTLPSpanExporter):
        """Takes a ``(payload, count)`` batch already encoded; the exporter's retries and channel handling stay."""

        def _translate_data(self, data: tuple[bytes, int]) -> ExportTraceServiceRequest:  # type: ignore[override]
            request: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(data[0])
            return request

        def _count_data(self, data: tuple[bytes, int]) -> int:  # type: ignore[override]
            return data[1]

    class GrpcSender:
        def __init__(self) -> None:
            # An http:// endpoint means plaintext (the Collector's and Jaeger's default 4317 listener).
            self._exporter = Exporter(
                endpoint=settings.otlp_endpoint,
                insecure=settings.otlp_endpoint.startswith("http://"),
                timeout=settings.export_timeout,
            )

        def send(self, payload: bytes, count: int) -> bool:
            return self._exporter._export((payload, count)) is SpanExportResult.SUCCESS  # type: ignore[arg-type]

        def close(self) -> None:
            self._exporter.shutdown()

    return GrpcSender()


def span_batcher(settings: TracingSettings, resource: bytes, scope: bytes) -> SpanBatcher:
    """The batcher for ``settings``: its sender, encoding with this process's resource and scope."""
    sender: Sender = _grpc_sender(settings) if settings.protocol == "grpc" else _HttpSender(settings)
    # The exporters log a line per failed export: during a collector outage that floods the gateway's own log.
    # Failures are counted in meshgate_tracing_spans_total{result="failed"} instead; errors still come through.
    logging.getLogger("opentelemetry.exporter.otlp").setLevel(logging.CRITICAL)
    return SpanBatcher(
        sender,
        lambda spans: encode_request(spans, resource, scope),
        max_queue=settings.max_queue,
        delay=settings.batch_delay,
    )
