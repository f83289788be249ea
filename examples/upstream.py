"""A small HTTP service to put behind meshgate: the demo's upstream and the tests' real upstream server.

Run: ``python examples/upstream.py --port 9001 --name a``. Endpoints:
  GET  /anything...        JSON echo: instance name, method, path, raw query, request headers
  GET  /bytes/{n}          n bytes streamed in 64 KiB chunks (Content-Length set; ``?chunked=1`` for chunked)
  POST /upload             reads the body as a stream; answers its length and sha256 (never holds it whole)
                           (bodies are never decompressed: a gzip body is hashed as the compressed bytes sent)
  GET  /status/{code}      answers with that status
  GET  /delay/{ms}         answers after ms milliseconds
  GET  /ws                 WebSocket echo (text and binary), subprotocols "echo" and "chat"
  GET  /healthz            200
  *    /flaky/{n}/{key}     the first n requests per key fail, later ones answer 200 with the body's length and
                           sha256 and ``calls`` (this key's request count). The body is always read whole first. Query:
                           ``fail=503`` (default; any status) or ``fail=reset`` (the connection is cut, no answer);
                           ``retry_after=S`` (default 1; empty = none) on a failure status; ``only=NAME`` fails only
                           on the instance named NAME (the others never fail, and count nothing)
  GET  /_count?path=P      how many requests this instance received for path P so far (every path but /_count is
                           counted, up to 10 000 distinct paths): ``{"instance", "path", "count"}``

``--delay-ms N`` slows every answer but /healthz by N ms: an instance that is slow for all requests, for the
latency-aware balancer tests.

``--tls-cert FILE --tls-key FILE`` serve HTTPS instead (TLS 1.2+); ``--tls-client-ca FILE`` also requires a client
certificate signed by that CA. Over TLS the echo adds ``"tls": {"sni", "client_cn", "version"}``: the server name the
client sent (null without SNI), the common name of the client's certificate (null without one), the protocol.

Faults at run time, for the resilience tests (``tests/e2e/test_faults.py``, ``bench/faults.py``):
  POST /_fault {"mode": "fail"}                     every answer is 503, /healthz included (a broken instance)
  POST /_fault {"mode": "slow", "delay_ms": 1000}   every answer but /healthz waits delay_ms first (default 1000)
  POST /_fault {"mode": "ok"}                       back to normal (``--delay-ms`` still applies)
  GET  /_fault                                      the current fault: {"instance", "mode", "delay_ms"}
(``/_count`` counts the requests a faulty instance received too, the 503s included.)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
import ssl
import struct
from collections import Counter
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

CHUNK = 64 * 1024
MAX_COUNTED_PATHS = 10_000  # /_count's memory bound: a long-running demo instance must not grow without end


FAULT_MODES = ("ok", "fail", "slow")


class Fault:
    """The instance's injected fault, set by ``POST /_fault``."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.delay_ms = 1000  # the "slow" mode's delay


def build_app(name: str, delay_ms: int = 0) -> web.Application:
    fault = Fault()

    received: Counter[str] = Counter()  # requests per path, for /_count
    flaky_calls: Counter[str] = Counter()  # requests per /flaky key

    async def echo(request: web.Request) -> web.Response:
        body = await request.read() if request.body_exists else b""
        payload = {
            "instance": name,
            "method": request.method,
            "path": request.raw_path.split("?", 1)[0],
            "query": request.raw_path.split("?", 1)[1] if "?" in request.raw_path else "",
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body_length": len(body),
        }
        tls = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
        if tls is not None:
            payload["tls"] = {"sni": getattr(tls, "sni", None), "client_cn": _client_cn(tls), "version": tls.version()}
        return web.json_response(payload, headers={"x-upstream-instance": name})

    async def stream_bytes(request: web.Request) -> web.StreamResponse:
        total = int(request.match_info["n"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.query.get("chunked") != "1":
            response.content_length = total
        await response.prepare(request)
        block = b"x" * CHUNK
        # HEAD: headers only. StreamResponse.write does not drop a HEAD body the way Response does, and body bytes
        # after a HEAD response are read as the start of the next response on the keep-alive connection.
        remaining = total if request.method != "HEAD" else 0
        while remaining > 0:
            n = min(CHUNK, remaining)
            await response.write(block[:n])
            remaining -= n
        await response.write_eof()
        return response

    async def upload(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            digest.update(chunk)
            size += len(chunk)
        return web.json_response(
            {
                "instance": name,
                "length": size,
                "sha256": digest.hexdigest(),
                "transfer_encoding": request.headers.get("Transfer-Encoding"),
                "content_length": request.headers.get("Content-Length"),
            }
        )

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        return web.json_response({"instance": name, "status": code}, status=code)

    async def delay(request: web.Request) -> web.Response:
        await asyncio.sleep(int(request.match_info["ms"]) / 1000)
        return web.json_response({"instance": name, "delayed_ms": int(request.match_info["ms"])})

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("echo", "chat"))
        await ws.prepare(request)
        async for message in ws:
            if message.type == web.WSMsgType.TEXT:
                if message.data == "close":
                    await ws.close(code=4000, message=b"bye")
                    break
                await ws.send_str(json.dumps({"instance": name, "echo": message.data}))
            elif message.type == web.WSMsgType.BINARY:
                await ws.send_bytes(message.data)
        return ws

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"instance": name, "status": "ok"})

    async def flaky(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            digest.update(chunk)
            size += len(chunk)
        key = request.match_info["key"]
        only = request.query.get("only")
        calls = 0
        if only is None or only == name:
            flaky_calls[key] += 1
            calls = flaky_calls[key]
            if calls <= int(request.match_info["n"]):
                fail = request.query.get("fail", "503")
                if fail == "reset":
                    transport = request.transport
                    assert transport is not None
                    sock = transport.get_extra_info("socket")
                    if sock is not None:  # linger 0: close() sends RST instead of FIN, a real "connection reset"
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    transport.abort()
                    raise web.HTTPInternalServerError()  # never sent: the connection is already gone
                retry_after = request.query.get("retry_after", "1")
                headers = {"Retry-After": retry_after} if retry_after else {}
                return web.json_response(
                    {"instance": name, "key": key, "calls": calls}, status=int(fail), headers=headers
                )
        payload = {"instance": name, "key": key, "calls": calls, "length": size, "sha256": digest.hexdigest()}
        return web.json_response(payload, headers={"x-upstream-instance": name})

    async def count(request: web.Request) -> web.Response:
        path = request.query.get("path", "")
        return web.json_response({"instance": name, "path": path, "count": received[path]})

    @web.middleware
    async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/_count" and (request.path in received or len(received) < MAX_COUNTED_PATHS):
            received[request.path] += 1
        return await handler(request)

    @web.middleware
    async def slow_down(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/healthz":
            await asyncio.sleep(delay_ms / 1000)
        return await handler(request)

    async def get_fault(_: web.Request) -> web.Response:
        return web.json_response({"instance": name, "mode": fault.mode, "delay_ms": fault.delay_ms})

    async def set_fault(request: web.Request) -> web.Response:
        wanted = await request.json()
        if not isinstance(wanted, dict) or wanted.get("mode") not in FAULT_MODES:
            return web.json_response({"error": f"mode must be one of {', '.join(FAULT_MODES)}"}, status=400)
        fault.mode = wanted["mode"]
        fault.delay_ms = int(wanted.get("delay_ms", 1000))
        return await get_fault(request)

    @web.middleware
    async def inject_fault(request: web.Request, handler: Handler) -> web.StreamResponse:
        if fault.mode == "ok" or request.path in ("/_fault", "/_count"):  # the controls never fail
            return await handler(request)
        if fault.mode == "fail":
            return web.json_response({"instance": name, "fault": "fail"}, status=503)
        if request.path != "/healthz":  # slow: health checks still pass, as with --delay-ms
            await asyncio.sleep(fault.delay_ms / 1000)
        return await handler(request)

    middlewares = [count_requests, inject_fault, slow_down] if delay_ms > 0 else [count_requests, inject_fault]
    app = web.Application(client_max_size=1024**3, middlewares=middlewares)
    app.router.add_get("/bytes/{n:[0-9]+}", stream_bytes)
    app.router.add_route("*", "/upload", upload)
    app.router.add_route("*", "/status/{code:[0-9]{3}}", status)
    app.router.add_get("/delay/{ms:[0-9]+}", delay)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/flaky/{n:[0-9]+}/{key}", flaky)
    app.router.add_get("/_count", count)
    app.router.add_get("/_fault", get_fault)
    app.router.add_post("/_fault", set_fault)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def _client_cn(tls: ssl.SSLObject) -> str | None:
    subject: Any = (tls.getpeercert() or {}).get("subject", ())
    for rdn in subject:  # ((("commonName", "gw"),), ...)
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def tls_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED

    def remember_sni(connection: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext) -> None:
        connection.sni = server_name  # type: ignore[attr-defined]  # read back by the echo

    context.sni_callback = remember_sni
    return context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="upstream")
    parser.add_argument("--delay-ms", type=int, default=0, help="delay every answer but /healthz (default 0)")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM; needs --tls-key)")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    parser.add_argument("--tls-client-ca", help="require client certificates signed by this CA (PEM)")
    args = parser.parse_args()
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_client_ca and not args.tls_cert):
        parser.error("--tls-cert and --tls-key go together; --tls-client-ca needs them")
    ssl_context = tls_context(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    # auto_decompress=False: /upload and the echo report the body exactly as it came over the wire, so a test can
    # prove a proxy forwarded a gzip body untouched (the default would decode it before the handler sees it).
    web.run_app(
        build_app(args.name, args.delay_ms),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        auto_decompress=False,
        ssl_context=ssl_context,
    )


if __name__ == "__main__":
    main()
