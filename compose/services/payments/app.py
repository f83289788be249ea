"""The demo's payments service: a plain HTTP app behind its meshgate sidecar (standard library only).

  GET  /healthz          200 (also while failing: a broken instance that still looks healthy, the case outlier
                         detection exists for)
  GET  /payments/{id}    {"id", "status", "instance"}
  POST /payments         {"amount": ...}: 201 {"id", "status": "captured", "instance"}

Environment: BIND (default 127.0.0.1), PORT (9002), INSTANCE (a name in the answers, default payments-PORT),
FAIL_RATIO (0..1, default 0): that share of answers other than /healthz are 503. The demo runs a second instance,
payments-b, with FAIL_RATIO=0.3, so the sidecar's retries and outlier ejection show on the dashboards.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PORT = int(os.environ.get("PORT", "9002"))
INSTANCE = os.environ.get("INSTANCE", f"payments-{PORT}")
FAIL_RATIO = float(os.environ.get("FAIL_RATIO", "0"))
PAYMENT_PATH = re.compile(r"/payments/([A-Za-z0-9-]+)")

_lock = threading.Lock()
_ids = itertools.count(1)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            return self._json(200, {"status": "ok", "instance": INSTANCE})
        if self._failing():
            return
        match = PAYMENT_PATH.fullmatch(path)
        if match is None:
            return self._json(404, {"error": "not_found", "path": path})
        return self._json(200, {"id": match.group(1), "status": "captured", "instance": INSTANCE})

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)  # always read the body: the connection stays usable
        if self.path.split("?", 1)[0] != "/payments":
            return self._json(404, {"error": "not_found"})
        if self._failing():
            return
        try:
            amount = float(json.loads(raw or b"{}").get("amount", 0))
        except (ValueError, AttributeError):
            return self._json(400, {"error": 'expected {"amount": number}'})
        with _lock:
            payment = f"p-{INSTANCE}-{next(_ids)}"
        return self._json(201, {"id": payment, "amount": amount, "status": "captured", "instance": INSTANCE})

    def _failing(self) -> bool:
        if FAIL_RATIO and random.random() < FAIL_RATIO:
            self._json(503, {"error": "payments temporarily unavailable", "instance": INSTANCE})
            return True
        return False

    def _json(self, status: int, body: object) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the sidecar's access log has every request


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    bind = os.environ.get("BIND", "127.0.0.1")
    server = ThreadingHTTPServer((bind, PORT), Handler)
    server.daemon_threads = True
    print(f"{INSTANCE} listening on {bind}:{PORT} (fail ratio {FAIL_RATIO})", flush=True)
    # As PID 1 in a container, SIGTERM does nothing unless handled: stop like Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
