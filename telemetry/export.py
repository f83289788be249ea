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

import structlog

from telemetry.otlp import encode_request
from telemetry.settings import TracingSettings

if TYPE_CHECKING:
    from telemetry.tracing import Span

__all__ = ["Sender", "SpanBatcher", "span_batcher"]

log = structlog.get_logger("meshgate.tracing")

# Spans per export request (the SDK's default batch size).
BATCH = 512


class Sender(Protocol):
    """Sends one encoded ``ExportTraceServiceRequest``; True on success. Blocking: runs in the export thread."""

    def send(self, payload: bytes, count: int) -> bool: ...

    def close(self) -> None: ...


class SpanBatcher:
    """Queue finished spans; export them in batches from a thread of its own. Counts what it exported, dropped and
    failed to deliver (``meshgate_tracing_spans_total``); logs when export starts and stops failing."""

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
        # Spans accepted (by the loop) and spans done with (by the thread), for flush(): it waits for the second to
        # reach what the first was when it was called. Each counter has a single writer.
        self._accepted = 0
        self._done = 0
        self._progress = threading.Condition()
        self._stopping = False
        self._failing = False
        self.exported = 0
        self.dropped = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="meshgate-span-export", daemon=True)
        self._thread.start()

    @property
    def stopped(self) -> bool:
        """The export thread has ended: the counts are final."""
        return not self._thread.is_alive()

    def counts(self) -> dict[str, int]:
        return {"exported": self.exported, "dropped": self.dropped, "failed": self.failed}

    def add(self, span: Span) -> None:
        """Called on the event loop for every finished recording span: an append, and rarely a wake-up."""
        queue = self._queue
        if len(queue) >= self._max_queue or self._stopping:
            self.dropped += 1
            return
        queue.append(span)
        self._accepted += 1
        if len(queue) == self._batch:
            self._wake.set()  # a full batch waits: send now rather than at the next tick

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until every span accepted so far was sent (or failed). Blocking."""
        target = self._accepted
        self._wake.set()
        with self._progress:
            return self._progress.wait_for(lambda: self._done >= target, timeout)

    def shutdown(self, timeout: float) -> None:
        """Send what is queued within ``timeout`` s, then stop. A send still stuck then is cut short by closing the
        sender (the exporters abort their retry waits on shutdown); the daemon thread ends with it or the process."""
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        self._stopping = True
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if not self.stopped:
            self._sender.close()

    def _run(self) -> None:
        queue = self._queue
        try:
            while not self._stopping or queue:
                self._wake.wait(self._delay)
                self._wake.clear()
                while queue:
                    self._send([queue.popleft() for _ in range(min(self._batch, len(queue)))])
        finally:
            self._sender.close()

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
        if delivered == self._failing:  # a change of state: say it once, not per batch
            self._failing = not delivered
            if self._failing:
                log.warning("span_export_failing", spans=len(batch), counted_in="meshgate_tracing_spans_total")
            else:
                log.info("span_export_recovered")
        with self._progress:
            self._done += len(batch)
            self._progress.notify_all()


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
    # The batcher logs the change of state once instead, and counts every span in meshgate_tracing_spans_total.
    logging.getLogger("opentelemetry.exporter.otlp").setLevel(logging.CRITICAL)
    return SpanBatcher(
        sender,
        lambda spans: encode_request(spans, resource, scope),
        max_queue=settings.max_queue,
        delay=settings.batch_delay,
    )
