"""A tiny OTLP/HTTP trace receiver for the benchmark: it counts spans, answers like a collector, keeps nothing.

Run as its own process (``bench/run.py`` starts it pinned to the load core, next to wrk)::

    python bench/otlp_sink.py [--port 0] [--host 127.0.0.1]

It prints ``otlp-sink listening on http://HOST:PORT`` once it accepts connections, then serves:

``POST /v1/traces``
    binary protobuf (``Content-Encoding`` gzip/deflate accepted); the body is decoded as an
    ``ExportTraceServiceRequest`` and its spans are counted by kind. The answer is an empty
    ``ExportTraceServiceResponse`` (200, ``application/x-protobuf``), so the exporter counts the batch as delivered.
    An undecodable body gets a 400 and is counted under ``errors``.
``GET /stats``
    JSON: ``export_requests``, ``spans``, ``spans_by_kind`` (``SERVER``, ``CLIENT``, ...), ``body_bytes``,
    ``errors``, ``last_export_unix``. The benchmark reads it before and after each measured run.

On SIGTERM/SIGINT it prints the final counters as one JSON line and exits 0. Decoding is the real protobuf parse
(upb), not a byte count, so a span that is counted is a span the collector would have accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import signal
import sys
import time
import zlib
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

TRACES_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"
# SpanKind numbers of OTLP (opentelemetry/proto/trace/v1/trace.proto) -> short names.
_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_REPLY = ExportTraceServiceResponse().SerializeToString()


class Counters:
    """What the sink has received so far."""

    def __init__(self) -> None:
        self.export_requests = 0
        self.spans = 0
        self.by_kind: dict[str, int] = {}
        self.body_bytes = 0
        self.errors = 0
        self.last_export_unix: float | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "export_requests": self.export_requests,
            "spans": self.spans,
            "spans_by_kind": dict(self.by_kind),
            "body_bytes": self.body_bytes,
            "errors": self.errors,
            "last_export_unix": self.last_export_unix,
        }


def count_spans(message: ExportTraceServiceRequest, by_kind: dict[str, int]) -> int:
    """Number of spans in an export request; adds them to ``by_kind``."""
    total = 0
    for resource_spans in message.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                kind = _KINDS.get(span.kind, str(span.kind))
                by_kind[kind] = by_kind.get(kind, 0) + 1
                total += 1
    return total


def make_app(counters: Counters) -> web.Application:
    async def export(request: web.Request) -> web.Response:
        body = await request.read()
        counters.export_requests += 1
        counters.body_bytes += len(body)
        try:
            encoding = request.headers.get("Content-Encoding", "identity").lower()
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            message = ExportTraceServiceRequest()
            message.ParseFromString(body)
        except Exception as error:  # any undecodable body: count it, answer 400 like a collector would
            counters.errors += 1
            return web.Response(status=400, text=f"undecodable export request: {error!r}")
        counters.spans += count_spans(message, counters.by_kind)
        counters.last_export_unix = time.time()
        return web.Response(body=_REPLY, content_type=PROTOBUF)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(counters.snapshot())

    app = web.Application(client_max_size=256 * 1024**2)
    app.router.add_post(TRACES_PATH, export)
    app.router.add_get("/stats", stats)
    return app


async def serve(host: str, port: int) -> Counters:
    counters = Counters()
    # auto_decompress=False: the handler decodes Content-Encoding itself (as tests/otlp_receiver.py does).
    runner = web.AppRunner(make_app(counters), access_log=None, auto_decompress=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    print(f"otlp-sink listening on http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
    return counters


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="OTLP/HTTP span-counting sink for bench/run.py")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed on start)")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        counters = asyncio.run(serve(args.host, args.port))
    else:
        counters = uvloop.run(serve(args.host, args.port))
    print(json.dumps(counters.snapshot()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
