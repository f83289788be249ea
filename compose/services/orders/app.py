"""The demo's orders service: a plain HTTP app that knows nothing about meshgate (standard library only).

Its sidecar (meshgate) authenticates, authorizes, traces and measures every request before it gets here. The app
passes on what a mesh app must: the caller's ``Authorization`` (payments decides on the same user) and the trace
context (``traceparent``, ``tracestate``, ``baggage``) plus ``x-request-id``, so a Jaeger trace runs from the orders
sidecar through the payments sidecar.

  GET  /healthz        200
  GET  /orders         the orders placed so far
  GET  /orders/{id}    one order and its payment, asked from payments (GET {PAYMENTS_URL}/payments/{id})
  POST /orders         {"item": ..., "amount": ...}: charges through payments (POST {PAYMENTS_URL}/payments), 201

Environment: BIND (default 127.0.0.1: only the sidecar in the same network namespace reaches the app), PORT (9001),
PAYMENTS_URL (http://127.0.0.1:8082, the payments sidecar).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PAYMENTS_URL = os.environ.get("PAYMENTS_URL", "http://127.0.0.1:8082").rstrip("/")
PASSED_ON = ("authorization", "traceparent", "tracestate", "baggage", "x-request-id")
ORDER_PATH = re.compile(r"/orders/([0-9]+)")

_lock = threading.Lock()
_ids = itertools.count(1001)
_orders: dict[int, dict[str, Any]] = {
    1: {"id": 1, "item": "espresso machine", "amount": 249.0, "payment": "p-1"},
    2: {"id": 2, "item": "grinder", "amount": 99.5, "payment": "p-2"},
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the sidecar pools its connections to the app

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            return self._json(200, {"status": "ok"})
        if path == "/orders":
            with _lock:
                return self._json(200, {"orders": list(_orders.values())})
        match = ORDER_PATH.fullmatch(path)
        if match is None:
            return self._json(404, {"error": "not_found", "path": path})
        with _lock:
            order = _orders.get(int(match.group(1)))
        if order is None:
            return self._json(404, {"error": "no such order"})
        status, payment = self._call("GET", f"/payments/{order['payment']}", None)
        return self._json(200 if status < 500 else 502, {**order, "payment_status": status, "payment_detail": payment})

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/orders":
            return self._json(404, {"error": "not_found"})
        length = int(self.headers.get("content-length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            item, amount = str(body.get("item", "coffee")), float(body.get("amount", 3.5))
        except (ValueError, AttributeError):
            return self._json(400, {"error": 'expected {"item": str, "amount": number}'})
        status, payment = self._call("POST", "/payments", {"amount": amount})
        if status != 201:
            return self._json(502, {"error": "payment failed", "payment_status": status, "payment_detail": payment})
        with _lock:
            order = {"id": next(_ids), "item": item, "amount": amount, "payment": payment.get("id")}
            _orders[order["id"]] = order
        return self._json(201, order)

    def _call(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        headers = {name: value for name in PASSED_ON if (value := self.headers.get(name))}
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["content-type"] = "application/json"
        request = urllib.request.Request(PAYMENTS_URL + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            with error:
                return error.code, _decoded(error.read())
        except (OSError, ValueError) as error:
            return 599, {"error": str(error)}

    def _json(self, status: int, body: object) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the sidecar's access log has every request, with its trace id


def _decoded(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    bind, port = os.environ.get("BIND", "127.0.0.1"), int(os.environ.get("PORT", "9001"))
    server = ThreadingHTTPServer((bind, port), Handler)
    server.daemon_threads = True
    print(f"orders listening on {bind}:{port} -> {PAYMENTS_URL}", flush=True)
    # As PID 1 in a container, SIGTERM does nothing unless handled: stop like Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
