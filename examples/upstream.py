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

``--delay-ms N`` slows every answer but /healthz by N ms: an instance that is slow for all requests, for the
latency-aware balancer tests.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json

from aiohttp import web
from aiohttp.typedefs import Handler

CHUNK = 64 * 1024


def build_app(name: str, delay_ms: int = 0) -> web.Application:
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

    @web.middleware
    async def slow_down(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/healthz":
            await asyncio.sleep(delay_ms / 1000)
        return await handler(request)

    app = web.Application(client_max_size=1024**3, middlewares=[slow_down] if delay_ms > 0 else [])
    app.router.add_get("/bytes/{n:[0-9]+}", stream_bytes)
    app.router.add_route("*", "/upload", upload)
    app.router.add_route("*", "/status/{code:[0-9]{3}}", status)
    app.router.add_get("/delay/{ms:[0-9]+}", delay)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="upstream")
    parser.add_argument("--delay-ms", type=int, default=0, help="delay every answer but /healthz (default 0)")
    args = parser.parse_args()
    # auto_decompress=False: /upload and the echo report the body exactly as it came over the wire, so a test can
    # prove a proxy forwarded a gzip body untouched (the default would decode it before the handler sees it).
    web.run_app(
        build_app(args.name, args.delay_ms),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        auto_decompress=False,
    )


if __name__ == "__main__":
    main()
