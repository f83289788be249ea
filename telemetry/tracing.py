"""Spans for the gateway: one SERVER span per request, one CLIENT span per upstream attempt, exported over OTLP.

The spans are recorded in small slotted objects of our own and handed to OpenTelemetry only at the end, as SDK
``ReadableSpan`` values, to the SDK's ``BatchSpanProcessor`` and OTLP exporter (``telemetry.export``). The SDK's own
``Span`` was measured at 31 µs a span in a tight loop and about twice that inside the proxy (locks, bounded
attribute containers, a ``getpid`` fork check, the context API); a request that is not sampled here costs two random
ids and nothing else, and a sampled one builds its attributes once, at the end.

Ids are always made, sampled or not: the log lines and local replies of every request carry ``trace_id`` and
``span_id``, and the upstream always receives a ``traceparent`` that continues the client's trace. Without a
``telemetry.tracing`` section nothing is exported and new traces are not sampled (flag ``00``), but a client's
sampled trace is still continued through to the upstream.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util.types import AttributeValue

from telemetry.propagation import Parent, extract, inject_headers
from telemetry.sampling import Sampler
from telemetry.settings import Propagator, TracingSettings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor

__all__ = ["Attributes", "ProcessorFactory", "Span", "Tracer"]

Attributes = dict[str, AttributeValue]
# Builds the span processor for a settings value (``telemetry.export.span_processor``); a seam for tests.
ProcessorFactory = Callable[[TracingSettings], "SpanProcessor"]

_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_ERROR: Final = Status(StatusCode.ERROR)
_UNSET: Final = Status(StatusCode.UNSET)
_SCOPE: Final = InstrumentationScope("meshgate")
_DEFAULT_PROPAGATORS: tuple[Propagator, ...] = ("tracecontext", "baggage")


class Span:
    """One span. Ids always exist; time, events and the export happen only when ``recording``.

    ``sampled`` is the flag passed on to the upstream. It differs from ``recording`` only without an exporter: a
    client's sampled trace is still continued as sampled, though this hop records nothing.
    """

    __slots__ = (
        "error",
        "events",
        "kind",
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
        self.events: list[Event] = []
        self.error = False  # set for the span status ERROR (5xx on a SERVER span, any failure on a CLIENT span)

    @property
    def trace_hex(self) -> str:
        return f"{self.trace_id:032x}"

    @property
    def span_hex(self) -> str:
        return f"{self.span_id:016x}"

    def event(self, name: str, attributes: Attributes | None = None) -> None:
        """Record why something happened (a retry, a trip, a rejection) at this moment; free when not sampled."""
        if self.recording:
            self.events.append(Event(name, attributes, time.time_ns()))


class Tracer:
    """Makes spans, decides sampling and hands finished sampled spans to the exporter. One per process.

    ``configure`` swaps settings on a config reload: the sampler and propagators at once; a changed export target
    gets a new span processor while the old one flushes and shuts down in a thread of its own (its export may block
    for the exporter's timeout, and no request may wait for that).
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        # Not the process-wide `random`: seeded from the OS once, so two workers never share an id sequence.
        self._ids = rng if rng is not None else random.Random(os.urandom(32))
        self._settings: TracingSettings | None = None
        self._processor: SpanProcessor | None = None
        self._sampler = Sampler(0.0)
        self._propagators = _DEFAULT_PROPAGATORS
        self._resource = Resource.create({"service.name": "meshgate"})
        self._service = ""

    @property
    def propagators(self) -> tuple[Propagator, ...]:
        return self._propagators

    @property
    def exporting(self) -> bool:
        return self._processor is not None

    def configure(self, settings: TracingSettings | None, service: str, processor_factory: ProcessorFactory) -> None:
        if service != self._service:
            self._service = service
            self._resource = Resource.create({"service.name": service, "service.instance.id": _instance_id()})
        if settings == self._settings:
            return
        old, self._settings = self._settings, settings
        if settings is None:
            self._sampler = Sampler(0.0)
            self._propagators = _DEFAULT_PROPAGATORS
        else:
            self._sampler = Sampler(settings.sample_ratio, settings.max_traces_per_second)
            self._propagators = settings.propagators
        if old is not None and settings is not None and _same_export(old, settings):
            return
        previous, self._processor = self._processor, (processor_factory(settings) if settings is not None else None)
        if previous is not None:
            threading.Thread(target=previous.shutdown, name="meshgate-span-processor-shutdown", daemon=True).start()

    def shutdown(self, timeout: float) -> None:
        """Export what is queued, waiting at most ``timeout`` seconds, then stop exporting.

        Blocking (up to ``timeout``): call it off the event loop.
        """
        processor, self._processor = self._processor, None
        if processor is None:
            return

        # The SDK's force_flush ignores its timeout (opentelemetry-python #4568): behind an export stuck on a dead
        # collector it waits out the export timeout, then exports the rest itself. So flush and shut down in a
        # daemon thread and wait for it only ``timeout`` seconds; what is still stuck then ends with the process.
        def flush_then_shutdown() -> None:
            processor.force_flush(int(timeout * 1000))
            processor.shutdown()

        worker = threading.Thread(target=flush_then_shutdown, name="meshgate-span-flush", daemon=True)
        worker.start()
        worker.join(timeout)

    # --- per request ---------------------------------------------------------------------------------------------

    def start_server(self, headers: Mapping[str, str], now: float) -> tuple[Span, Parent | None]:
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
            recording=sampled and self._processor is not None,
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

    def context_headers(self, span: Span, parent: Parent | None) -> dict[str, str]:
        """The headers that make the upstream continue the trace as a child of ``span``."""
        return inject_headers(span.trace_id, span.span_id, span.sampled, parent, self._propagators)

    def end(self, span: Span, name: str, attributes: Attributes) -> None:
        """Finish a recording span and queue it for export (the caller checks ``span.recording`` first)."""
        processor = self._processor
        if processor is None:
            return
        trace_id = span.trace_id
        parent = SpanContext(trace_id, span.parent_id, span.remote_parent, _SAMPLED) if span.parent_id else None
        processor.on_end(
            ReadableSpan(
                name,
                context=SpanContext(trace_id, span.span_id, False, _SAMPLED),
                parent=parent,
                resource=self._resource,
                attributes=attributes,
                events=span.events,
                kind=span.kind,
                status=_ERROR if span.error else _UNSET,
                start_time=span.start_ns,
                end_time=time.time_ns(),
                instrumentation_scope=_SCOPE,
            )
        )


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
