"""Spans for the gateway: one SERVER span per request, one CLIENT span per upstream attempt, exported over OTLP.

Spans are small slotted records of our own; a finished one is queued as is and encoded to OTLP protobuf in the
export thread (``telemetry.export``, ``telemetry.otlp``). The OpenTelemetry SDK's own ``Span`` was measured at 31 µs
a span in a tight loop and about twice that inside the proxy (locks, bounded attribute containers, a ``getpid`` fork
check, the context API), and its encoder at 45 µs a span. Here a request that is not sampled costs two random ids,
and a sampled one builds its attributes once, at the end.

Ids are always made, sampled or not: the log lines and local replies of every request carry ``trace_id`` and
``span_id``, and the upstream always receives a ``traceparent`` that continues the client's trace. Without a
``telemetry.tracing`` section nothing is exported and new traces are not sampled (flag ``00``), but a client's
sampled trace is still continued to the upstream with its flag.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import structlog
from multidict import MultiMapping
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import SpanKind

from telemetry.export import SpanBatcher
from telemetry.otlp import AttributeValue, encode_resource, encode_scope
from telemetry.propagation import Parent, extract, inject_headers
from telemetry.sampling import Sampler
from telemetry.settings import Propagator, TracingSettings

__all__ = ["Attributes", "BatcherFactory", "Span", "Tracer"]

Attributes = dict[str, AttributeValue | Sequence[AttributeValue]]
Event = tuple[str, int, Attributes | None]  # name, time (ns since the epoch), attributes
# Builds the exporting batcher for a settings value, given the encoded resource and scope; a seam for tests.
BatcherFactory = Callable[[TracingSettings, bytes, bytes], SpanBatcher]

log = structlog.get_logger("meshgate.tracing")

_SCOPE: Final = encode_scope("meshgate")
_DEFAULT_PROPAGATORS: tuple[Propagator, ...] = ("tracecontext", "baggage")
# Seconds a batcher replaced by a reload gets to send what it holds.
_RETIRE_TIMEOUT: Final = 10.0


class Span:
    """One span. Ids always exist; time, events and the export happen only when ``recording``.

    ``sampled`` is the flag passed on to the upstream. It differs from ``recording`` only without an exporter: a
    client's sampled trace is still continued as sampled, though this hop records nothing.
    """

    __slots__ = (
        "attributes",
        "end_ns",
        "error",
        "events",
        "kind",
        "name",
        "parent_id",
        "recording",
        "remote_parent",
        "sampled",
        "span_id",
        "start_ns",
        "trace_id",
    )

    def __init__(
        self,
        trace_id: int,
        span_id: int,
        parent_id: int,
        kind: SpanKind,
        *,
        sampled: bool,
        recording: bool,
        remote_parent: bool = False,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id  # 0: a root span
        self.remote_parent = remote_parent
        self.kind = kind
        self.sampled = sampled
        self.recording = recording
        self.start_ns = time.time_ns() if recording else 0
        self.end_ns = 0
        self.name = ""
        self.attributes: Attributes = {}
        self.events: list[Event] = []
        self.error = False  # set for the span status ERROR (5xx on a SERVER span, any failure on a CLIENT span)

    @property
    def trace_hex(self) -> str:
        return f"{self.trace_id:032x}"

    @property
    def span_hex(self) -> str:
        return f"{self.span_id:016x}"

    def event(self, name: str, attributes: Attributes | None = None) -> None:
        """Record why something happened (a retry, a trip, a rejection) at this moment; free when not recording."""
        if self.recording:
            self.events.append((name, time.time_ns(), attributes))


class Tracer:
    """Makes spans, decides sampling and queues finished recording spans for export. One per process.

    ``configure`` swaps settings on a config reload: the sampler and propagators at once; a changed export target
    gets a new batcher while the old one sends what it holds and stops in a thread of its own (its send may block
    for the export timeout, and no request may wait for that).
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        # Not the process-wide `random`: seeded from the OS once, so two workers never share an id sequence.
        self._ids = rng if rng is not None else random.Random(os.urandom(32))
        self._settings: TracingSettings | None = None
        self._batcher: SpanBatcher | None = None
        self._sampler = Sampler(0.0)
        self._propagators = _DEFAULT_PROPAGATORS
        self._service = ""
        self._resource = b""
        # Batchers replaced by a reload, still sending what they held; then their final counts. Both are read and
        # changed on the event loop only (``counts`` folds a retired batcher in once its thread is gone), so the
        # exported totals never go down across reloads and no update races the export threads.
        self._retiring: list[SpanBatcher] = []
        self._retired = {"exported": 0, "dropped": 0, "failed": 0}

    @property
    def propagators(self) -> tuple[Propagator, ...]:
        return self._propagators

    @property
    def exporting(self) -> bool:
        return self._batcher is not None

    def counts(self) -> Mapping[str, int]:
        """Spans ``exported``, ``dropped`` (queue full) and ``failed`` (the collector did not take them), so far."""
        for batcher in [b for b in self._retiring if b.stopped]:
            self._retiring.remove(batcher)
            for key, value in batcher.counts().items():
                self._retired[key] += value
        totals = dict(self._retired)
        for batcher in (*self._retiring, *([self._batcher] if self._batcher is not None else [])):
            for key, value in batcher.counts().items():
                totals[key] += value
        return totals

    def configure(self, settings: TracingSettings | None, service: str, batcher_factory: BatcherFactory) -> None:
        """Apply a snapshot's tracing settings. If the new exporter cannot be built, nothing changes (logged)."""
        if settings == self._settings and service == self._service:
            return
        resource = self._resource
        if service != self._service:
            # Resource.create adds the SDK's standard attributes and OTEL_RESOURCE_ATTRIBUTES; encoded once here.
            attributes = Resource.create({"service.name": service, "service.instance.id": _instance_id()}).attributes
            resource = encode_resource({k: v for k, v in attributes.items() if isinstance(v, str | bool | int | float)})
        batcher = self._batcher
        rebuild = resource != self._resource or not (
            self._settings is not None and settings is not None and _same_export(self._settings, settings)
        )
        if rebuild:
            try:
                batcher = batcher_factory(settings, resource, _SCOPE) if settings is not None else None
            except Exception:  # e.g. a bad OTEL_EXPORTER_OTLP_* variable: keep tracing as it was
                log.exception("tracing_exporter_failed", endpoint=settings.otlp_endpoint if settings else None)
                return
        # Everything built: commit at once.
        if rebuild and self._batcher is not None:
            self._retire(self._batcher)
        self._batcher = batcher
        self._settings, self._service, self._resource = settings, service, resource
        self._sampler = Sampler(settings.sample_ratio, settings.max_traces_per_second) if settings else Sampler(0.0)
        self._propagators = settings.propagators if settings is not None else _DEFAULT_PROPAGATORS

    def shutdown(self, timeout: float) -> None:
        """Send what is queued, waiting at most ``timeout`` seconds, then stop exporting. Blocking: off the loop."""
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.shutdown(timeout)

    def _retire(self, batcher: SpanBatcher) -> None:
        self._retiring.append(batcher)
        threading.Thread(
            target=batcher.shutdown, args=(_RETIRE_TIMEOUT,), name="meshgate-span-export-retire", daemon=True
        ).start()

    # --- per request ---------------------------------------------------------------------------------------------

    def start_server(self, headers: MultiMapping[str], now: float) -> tuple[Span, Parent | None]:
        """The SERVER span for a request, continuing the client's trace when it sent one."""
        getrandbits = self._ids.getrandbits
        parent = extract(headers, self._propagators)
        if parent is not None:
            trace_id, parent_id, parent_sampled = parent.trace_id, parent.span_id, parent.sampled
        else:
            trace_id, parent_id, parent_sampled = getrandbits(128) or 1, 0, None
        sampled = self._sampler.sample(parent_sampled, trace_id, now)
        span = Span(
            trace_id,
            getrandbits(64) or 1,
            parent_id,
            SpanKind.SERVER,
            sampled=sampled,
            recording=sampled and self._batcher is not None,
            remote_parent=parent is not None,
        )
        return span, parent

    def start_client(self, server: Span) -> Span:
        """A CLIENT span for one upstream attempt, child of the request's SERVER span."""
        return Span(
            server.trace_id,
            self._ids.getrandbits(64) or 1,
            server.span_id,
            SpanKind.CLIENT,
            sampled=server.sampled,
            recording=server.recording,
        )

    def start_internal(self, server: Span) -> Span:
        """An INTERNAL child span of the request's SERVER span (the ``authz`` decision)."""
        return Span(
            server.trace_id,
            self._ids.getrandbits(64) or 1,
            server.span_id,
            SpanKind.INTERNAL,
            sampled=server.sampled,
            recording=server.recording,
        )

    def context_headers(self, span: Span, parent: Parent | None) -> dict[str, str]:
        """The headers that make the upstream continue the trace as a child of ``span``."""
        return inject_headers(span.trace_id, span.span_id, span.sampled, parent, self._propagators)

    def end(self, span: Span, name: str, attributes: Attributes) -> None:
        """Finish a recording span and queue it for export (the caller checks ``span.recording`` first)."""
        batcher = self._batcher
        if batcher is None:
            return  # tracing was switched off by a reload while this request ran
        span.name = name
        span.attributes = attributes
        span.end_ns = time.time_ns()
        batcher.add(span)


def _same_export(a: TracingSettings, b: TracingSettings) -> bool:
    return (a.otlp_endpoint, a.protocol, a.max_queue, a.batch_delay, a.export_timeout) == (
        b.otlp_endpoint,
        b.protocol,
        b.max_queue,
        b.batch_delay,
        b.export_timeout,
    )


def _instance_id() -> str:
    return f"{os.uname().nodename}-{os.getpid()}"
