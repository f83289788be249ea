"""Fresh-connection load for ``bench/tls.py``: every request on a new TCP (and, with a CA, TLS) connection.

Each of ``--threads`` threads loops until ``--duration`` has passed: connect, TLS handshake (full: no session is
reused), ``GET / HTTP/1.1`` with ``Connection: close``, read until the server closes, close. The server closes
first, so TIME_WAIT stays on the server's side and the client's ephemeral ports do not run out. Prints one JSON
object: connections completed, errors by kind, the negotiated TLS version and cipher, per-connection latency
(connect to end of response) percentiles. The harness measures the *server's* CPU; this process's own CPU is
taken by the harness from its rusage.

    python bench/conn_client.py --port 8443 --ca ca.pem [--cert c.pem --key c.key] [--no-check-hostname]
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import ssl
import sys
import threading
import time
from collections.abc import Sequence

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: bench-conn-client\r\nConnection: close\r\n\r\n"


def _context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.ca:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = not args.no_check_hostname  # mesh certificates name a SPIFFE URI, not a host
    context.load_verify_locations(args.ca)
    if args.cert:
        context.load_cert_chain(args.cert, args.key)
    return context


def one(host: str, port: int, context: ssl.SSLContext | None, server_name: str) -> tuple[int, str | None]:
    """One connection, one request; returns (bytes read, "version cipher" for TLS)."""
    sock = socket.create_connection((host, port), timeout=5.0)
    tls = None
    try:
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=server_name)
            cipher = sock.cipher()
            tls = f"{sock.version()} {cipher[0] if cipher else '?'}"
        sock.sendall(REQUEST)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
        body = b"".join(chunks)
        if not body.startswith(b"HTTP/1.1 200"):
            raise ValueError(f"unexpected answer {body[:60]!r}")
        return len(body), tls
    finally:
        sock.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--ca", help="CA bundle: connect over TLS and verify the server against it")
    parser.add_argument("--cert", help="client certificate (mTLS)")
    parser.add_argument("--key", help="its key")
    parser.add_argument("--server-name", default="127.0.0.1")
    parser.add_argument("--no-check-hostname", action="store_true", help="verify the chain only (mesh certificates)")
    args = parser.parse_args(argv)
    context = _context(args)
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    tls_seen: set[str] = set()
    lock = threading.Lock()
    deadline = time.monotonic() + args.duration

    def worker() -> None:
        mine: list[float] = []
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                _, tls = one(args.host, args.port, context, args.server_name)
            except (OSError, ValueError) as error:
                with lock:
                    errors[type(error).__name__] += 1
                continue
            mine.append(time.perf_counter() - started)
            if tls and tls not in tls_seen:
                with lock:
                    tls_seen.add(tls)
        with lock:
            latencies.extend(mine)

    started = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started
    latencies.sort()

    def pct(p: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1e3, 3) if latencies else None

    out = {
        "connections": len(latencies),
        "seconds": round(seconds, 3),
        "rate": round(len(latencies) / seconds, 1) if seconds > 0 else None,
        "errors": dict(errors),
        "tls": sorted(tls_seen),
        "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99)},
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
