"""A local trace store for ``meshgate demo``: takes spans over OTLP/HTTP, answers a subset of Jaeger's query API.

The compose stack runs the real Jaeger v2; ``meshgate demo`` runs that topology without Docker, where Jaeger cannot
run. This process stands in for it there, and only there, on Jaeger's ports, so the demo prints the same URLs::

    python -m gateway.demo.traces --otlp 127.0.0.1:4318 --query 127.0.0.1:16686 [--max-traces 2000]

It is not Jaeger: no UI, no OTLP/gRPC or OTLP/JSON, memory only (past ``--max-traces`` the oldest trace goes; past
``--max-spans-per-trace`` spans are dropped and counted in the trace's ``warnings``). ``POST /v1/traces`` takes a
binary protobuf ``ExportTraceServiceRequest`` (gzip or deflate too): 200 and an ``ExportTraceServiceResponse``, 400
for an undecodable body, 415 for another type or encoding. The query port answers, in Jaeger's JSON shapes:
``/api/traces/{traceID}`` (any case, leading zeros optional; 404 ``trace not found``), ``/api/traces?service=S``
(``operation``, ``tags`` as a JSON object of strings, ``tag=k:v``, ``limit``, ``start``/``end`` in µs, ``lookback``
such as ``1h`` when there is no ``start``: traces with one span matching all of them, newest first; tags compare as
Jaeger renders values, ints in decimal and booleans ``true``/``false``), ``/api/services`` and
``/api/services/{service}/operations``.

How spans are translated and searched: ``jaeger.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from gateway.config.values import parse_address
from gateway.demo.jaeger import Json, Search, StoredSpan, convert, normalize_trace_id, parse_search, trace_json

__all__ = [
    "TraceStore",
    "inflate",
    "main",
    "otlp_app",
    "query_app",
    "serve",
]

PROTOBUF = "application/x-protobuf"
MAX_BODY = 64 * 1024**2  # per export request, compressed and inflated alike
MAX_OPERATIONS = 1000  # per service: names come from clients, so this index is bounded like the traces
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # deflate in HTTP is the zlib format


# --- the store ------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Trace:
    spans: list[StoredSpan] = field(default_factory=list)
    span_ids: set[str] = field(default_factory=set)  # a span sent again (an exporter's retry) is kept once
    start: int = 2**63  # the earliest span start (µs): searches answer newest first by it
    dropped: int = 0


class TraceStore:
    """Traces in memory by id, in arrival order of their first span; the oldest is evicted past ``max_traces``."""

    def __init__(self, max_traces: int = 2000, max_spans: int = 10_000) -> None:
        self.max_traces, self.max_spans = max_traces, max_spans
        self._traces: OrderedDict[str, _Trace] = OrderedDict()
        self._operations: dict[str, set[str]] = {}  # service -> operation names; kept after eviction, as in Jaeger

    def add(self, spans: Iterable[StoredSpan]) -> None:
        for stored in spans:
            trace_id = stored.span["traceID"]
            trace = self._traces.get(trace_id)
            if trace is None:
                trace = self._traces[trace_id] = _Trace()
                if len(self._traces) > self.max_traces:
                    self._traces.popitem(last=False)
            if stored.span["spanID"] in trace.span_ids:
                continue
            if len(trace.spans) >= self.max_spans:
                trace.dropped += 1
                continue
            trace.spans.append(stored)
            trace.span_ids.add(stored.span["spanID"])
            trace.start = min(trace.start, stored.span["startTime"])
            operations = self._operations.setdefault(stored.service, set())
            if len(operations) < MAX_OPERATIONS:
                operations.add(stored.span["operationName"])

    def get(self, trace_id: str) -> Json | None:
        trace = self._traces.get(trace_id)
        return None if trace is None else trace_json(trace_id, trace.spans, trace.dropped)

    def find(self, search: Search) -> list[Json]:
        found = [(t.start, tid, t) for tid, t in self._traces.items() if any(search.matches(s) for s in t.spans)]
        found.sort(key=lambda item: item[0], reverse=True)
        found = found[: search.limit] if search.limit > 0 else found
        return [trace_json(trace_id, trace.spans, trace.dropped) for _, trace_id, trace in found]

    def services(self) -> list[str]:
        return sorted(self._operations)

    def operations(self, service: str) -> list[str]:
        return sorted(self._operations.get(service, ()))


# --- HTTP -----------------------------------------------------------------------------------------------------------

INDEX = """meshgate demo's local trace store: a stand-in for Jaeger in `meshgate demo` only (the compose stack runs the
real Jaeger v2). Spans are kept in memory; there is no UI. Jaeger's query API, the subset it answers:

  GET /api/traces/{traceID}
  GET /api/traces?service=S[&operation=O][&tags={"key":"value"}][&tag=key:value][&limit=N][&lookback=1h]
      (with curl: -G and --data-urlencode 'tags={...}', or -g; else curl's globbing eats the braces)
  GET /api/services
  GET /api/services/{service}/operations

Spans arrive over OTLP/HTTP (binary protobuf): POST /v1/traces on the OTLP port.
"""


def _jaeger(data: Any, *, total: int = 0) -> web.Response:
    return web.json_response({"data": data, "total": total, "limit": 0, "offset": 0, "errors": None})


def _error(status: int, message: str) -> web.Response:
    body = {"data": None, "total": 0, "limit": 0, "offset": 0, "errors": [{"code": status, "msg": message}]}
    return web.json_response(body, status=status)


def inflate(body: bytes, encoding: str, limit: int = MAX_BODY) -> bytes:
    """The body without its Content-Encoding (identity, gzip or deflate): ``LookupError`` for another encoding,
    ``ValueError``/``zlib.error`` for a body that is truncated, corrupt or inflates past ``limit`` bytes."""
    if encoding in ("", "identity"):
        return body
    if encoding not in _WBITS:
        raise LookupError(f"unsupported Content-Encoding {encoding!r}")
    inflater = zlib.decompressobj(_WBITS[encoding])
    data = inflater.decompress(body, limit)  # bounded: a small gzip body can inflate to gigabytes
    if inflater.unconsumed_tail or not inflater.eof:
        raise ValueError("body truncated or inflating past the size limit")
    return data


def otlp_app(store: TraceStore) -> web.Application:
    async def export(request: web.Request) -> web.Response:
        if request.content_type != PROTOBUF:
            return web.Response(status=415, text=f"only {PROTOBUF} is accepted (no OTLP/JSON here)")
        body = await request.read()
        try:
            message = ExportTraceServiceRequest.FromString(
                inflate(body, request.headers.get("Content-Encoding", "").strip().lower())
            )
        except LookupError as error:
            return web.Response(status=415, text=str(error))
        except Exception as error:  # zlib.error, ValueError, protobuf's DecodeError: the body is not an export request
            return web.Response(status=400, text=f"undecodable export request: {error}")
        spans, rejected = convert(message)
        store.add(spans)
        reply = ExportTraceServiceResponse()
        if rejected:  # OTLP's partial success: the exporter is told, and does not retry
            reply.partial_success.rejected_spans = rejected
            reply.partial_success.error_message = "trace id must be 16 bytes, not all zero; span id 8 bytes"
        return web.Response(body=reply.SerializeToString(), content_type=PROTOBUF)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/v1/traces", export)
    return app


def query_app(store: TraceStore) -> web.Application:
    async def index(request: web.Request) -> web.Response:
        return web.Response(text=INDEX)

    async def trace(request: web.Request) -> web.Response:
        try:
            trace_id = normalize_trace_id(request.match_info["trace_id"])
        except ValueError as error:
            return _error(400, str(error))
        found = store.get(trace_id)
        return _error(404, "trace not found") if found is None else _jaeger([found])

    async def search(request: web.Request) -> web.Response:
        try:
            query = parse_search(request.query, time.time_ns() // 1000)
        except ValueError as error:
            return _error(400, str(error))
        return _jaeger(store.find(query))

    async def services(request: web.Request) -> web.Response:
        names = store.services()
        return _jaeger(names, total=len(names))

    async def operations(request: web.Request) -> web.Response:
        names = store.operations(request.match_info["service"])
        return _jaeger(names, total=len(names))

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/api/traces/{trace_id}", trace)
    app.router.add_get("/api/traces", search)
    app.router.add_get("/api/services", services)
    app.router.add_get("/api/services/{service}/operations", operations)
    return app


async def serve(otlp: tuple[str, int], query: tuple[str, int], store: TraceStore) -> int:
    """Serve both ports until SIGTERM/SIGINT (0), or 1 with one line on stderr when a port cannot be bound."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):  # first, so a signal during startup still stops cleanly
        loop.add_signal_handler(signum, stop.set)
    runners: list[web.AppRunner] = []
    urls: list[str] = []
    try:
        for app, (host, port) in ((otlp_app(store), otlp), (query_app(store), query)):
            # auto_decompress=False: the OTLP handler inflates the body itself, with a bound on its size.
            runner = web.AppRunner(app, access_log=None, auto_decompress=False)
            runners.append(runner)
            await runner.setup()
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as error:
                print(f"traces: cannot listen on {host}:{port}: {error.strerror or error}", file=sys.stderr)
                return 1
            shown = f"[{host}]" if ":" in host else host
            urls.append(f"http://{shown}:{runner.addresses[0][1]}")
        print(f"traces: OTLP on {urls[0]}, query on {urls[1]}", flush=True)
        await stop.wait()
        return 0
    finally:
        for runner in reversed(runners):
            await runner.cleanup()


def _address(text: str) -> tuple[str, int]:
    try:
        address = parse_address(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return address.host, address.port


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.demo.traces", description="meshgate demo's local trace store"
    )
    parser.add_argument("--otlp", type=_address, default="127.0.0.1:4318", help="OTLP/HTTP listen address")
    parser.add_argument("--query", type=_address, default="127.0.0.1:16686", help="query API listen address")
    parser.add_argument("--max-traces", type=_positive, default=2000, help="traces kept; the oldest go first")
    parser.add_argument("--max-spans-per-trace", type=_positive, default=10_000, help="spans kept per trace")
    args = parser.parse_args(argv)
    store = TraceStore(args.max_traces, args.max_spans_per_trace)
    try:
        import uvloop
    except ImportError:
        code = asyncio.run(serve(args.otlp, args.query, store))
    else:
        code = uvloop.run(serve(args.otlp, args.query, store))
    # Done: a late second signal (a Ctrl-C in the terminal that started it by hand, then a SIGTERM) must not turn
    # exit 0 into a kill once the event loop, and with it the handlers, are gone.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(main())
