"""Stand-ins for Jaeger / the OpenTelemetry Collector that speak real OTLP, for tests that check exported traces.

``OtlpHttpReceiver`` answers ``POST /v1/traces`` (OTLP/HTTP, binary protobuf, optionally gzip or deflate
compressed); ``OtlpGrpcReceiver`` serves ``opentelemetry.proto.collector.trace.v1.TraceService/Export`` over
plaintext gRPC. Each runs on 127.0.0.1 at a free port, on its own event loop in a background thread, so it serves
sync pytest tests and async ones alike (a test's own loop may be blocked in a sync call while spans arrive). Both
are context managers and decode every span they receive into a ``ReceivedSpan``, kept in a thread-safe list::

    with OtlpHttpReceiver() as receiver:
        ...  # point the exporter at receiver.endpoint (the gateway appends /v1/traces itself)
        [server] = receiver.wait_for(lambda s: s.kind == "SERVER" and s.trace_id == trace_id)

Nothing is mocked: the bytes decoded are those the exporter put on the wire.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
import zlib
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Self

import grpc  # type: ignore[import-untyped]
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.procs import free_port

__all__ = ["OtlpGrpcReceiver", "OtlpHttpReceiver", "OtlpReceiver", "ReceivedSpan", "decode_any_value", "decode_request"]

PROTOBUF = "application/x-protobuf"
TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the receiver decoded it: ids in lower-case hex, enums by their short names."""

    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    name: str
    kind: str  # "SERVER", "CLIENT", "INTERNAL", "PRODUCER", "CONSUMER" or "UNSPECIFIED"
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status_code: str  # "UNSET", "OK" or "ERROR"
    start_ns: int
    end_ns: int
    resource: dict[str, Any]
    scope: str
    status_message: str = ""
    trace_state: str = ""
    flags: int = 0
    links: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # (trace_id, span_id, attributes)

    def event(self, name: str) -> list[dict[str, Any]]:
        """The attributes of each event named ``name``, in order."""
        return [attributes for event_name, attributes in self.events if event_name == name]


def decode_any_value(value: common_pb2.AnyValue) -> Any:
    """An OTLP ``AnyValue`` as a plain Python value (None when unset)."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [decode_any_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)


def _attributes(pairs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {pair.key: decode_any_value(pair.value) for pair in pairs}


def _enum_name(enum: Any, number: int, prefix: str) -> str:
    try:
        name: str = enum.Name(number)
    except ValueError:
        return str(number)
    return name.removeprefix(prefix)


def decode_request(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    """Every span of an export request, flattened, with its resource attributes and scope name."""
    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=_enum_name(trace_pb2.Span.SpanKind, span.kind, "SPAN_KIND_"),
                        attributes=_attributes(span.attributes),
                        events=[(event.name, _attributes(event.attributes)) for event in span.events],
                        status_code=_enum_name(trace_pb2.Status.StatusCode, span.status.code, "STATUS_CODE_"),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        resource=resource,
                        scope=scope,
                        status_message=span.status.message,
                        trace_state=span.trace_state,
                        flags=span.flags,
                        links=[
                            (link.trace_id.hex(), link.span_id.hex(), _attributes(link.attributes))
                            for link in span.links
                        ],
                    )
                )
    return spans


class OtlpReceiver:
    """The shared part: a background thread running an event loop, and the collected spans."""

    kind = "otlp"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self._requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []  # requests that could not be decoded, for a test to report

    # --- what tests read ------------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The base URL an exporter is given: ``http://127.0.0.1:PORT`` (OTLP/HTTP appends ``/v1/traces``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def spans(self) -> list[ReceivedSpan]:
        """A snapshot of every span received so far, in arrival order."""
        with self._lock:
            return list(self._spans)

    @property
    def requests(self) -> int:
        """How many export requests arrived (decoded or not)."""
        with self._lock:
            return self._requests

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self._requests = 0
            self.errors.clear()

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [span for span in self.spans if span.trace_id == trace_id]

    def wait_for(
        self, predicate: Callable[[ReceivedSpan], bool], timeout: float = 10.0, *, count: int = 1
    ) -> list[ReceivedSpan]:
        """Poll until at least ``count`` received spans satisfy ``predicate``; return all that do (arrival order).

        Raises ``TimeoutError`` naming what did arrive, so a failing test says why.
        """
        deadline = time.monotonic() + timeout
        while True:
            matching = [span for span in self.spans if predicate(span)]
            if len(matching) >= count:
                return matching
            if time.monotonic() > deadline:
                seen = [(span.name, span.kind, span.trace_id) for span in self.spans]
                raise TimeoutError(
                    f"{len(matching)} of {count} wanted spans after {timeout}s; {self.requests} export requests, "
                    f"spans received: {seen[-20:]}; errors: {self.errors[-3:]}"
                )
            time.sleep(0.05)

    # --- lifecycle ------------------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name=f"{self.kind}-receiver", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._call(self._start(), timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if loop.is_running():
                self._call(self._stop(), timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = None

    def _call(self, coroutine: Coroutine[Any, Any, None], timeout: float) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _record(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self._requests += 1
            self._spans.extend(spans)

    def _record_error(self, message: str) -> None:
        with self._lock:
            self._requests += 1
            self.errors.append(message)

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError


class OtlpHttpReceiver(OtlpReceiver):
    """OTLP/HTTP with binary protobuf: ``POST /v1/traces`` -> ``ExportTraceServiceResponse``, 200.

    ``status`` (default 200) lets a test play a failing collector: any other value is answered with that status
    (the spans are still recorded, as a collector that crashed after reading them would leave them).
    """

    kind = "otlp-http"

    def __init__(self, port: int | None = None, *, status: int = 200) -> None:
        super().__init__(port)
        self.status = status
        self._runner: web.AppRunner | None = None

    @property
    def traces_url(self) -> str:
        return self.endpoint + TRACES_PATH

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "identity").lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding != "identity":
                self._record_error(f"unsupported Content-Encoding {encoding!r}")
                return web.Response(status=415, text=f"unsupported Content-Encoding {encoding!r}")
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
            if content_type != PROTOBUF:
                self._record_error(f"unsupported Content-Type {content_type!r}")
                return web.Response(status=415, text=f"only {PROTOBUF} is accepted")
            message = trace_service_pb2.ExportTraceServiceRequest()
            message.ParseFromString(body)
        except Exception as exc:
            self._record_error(f"undecodable request: {exc!r}")
            return web.Response(status=400, text="undecodable request")
        self._record(decode_request(message))
        if self.status != 200:
            return web.Response(status=self.status, text="collector unavailable")
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type=PROTOBUF)

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post(TRACES_PATH, self._export)
        # auto_decompress=False: the body is decoded here, per Content-Encoding, exactly as it came over the wire.
        self._runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpGrpcReceiver) -> None:
        self._receiver = receiver

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._receiver._record(decode_request(request))
        if self._receiver.status != grpc.StatusCode.OK:
            await context.abort(self._receiver.status, "collector unavailable")
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpGrpcReceiver(OtlpReceiver):
    """OTLP/gRPC, plaintext: ``TraceService/Export``. The exporter's endpoint is ``http://127.0.0.1:PORT``."""

    kind = "otlp-grpc"

    def __init__(self, port: int | None = None, *, status: grpc.StatusCode = grpc.StatusCode.OK) -> None:
        super().__init__(port)
        self.status = status
        self._server: grpc.aio.Server | None = None

    async def _start(self) -> None:
        server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self), server
        )
        bound = server.add_insecure_port(f"127.0.0.1:{self.port}")
        if bound == 0:
            raise OSError(f"could not bind 127.0.0.1:{self.port}")
        await server.start()
        self._server = server

    async def _stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None
