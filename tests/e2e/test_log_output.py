"""The gateway's stdout from outside: a stdout nobody reads never stalls requests, every line is JSON and every
access line is written or accounted for, and secrets reach neither stdout nor stderr."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.procs import ROOT, free_port, metric_sum, raw_http, stop, wait_http

pytestmark = pytest.mark.e2e

REQUESTS = 3000
CONCURRENCY = 16
SECRET = "s3cr3t"


@dataclass
class PipedGateway:
    """`meshgate run` whose stdout is a pipe the test reads only when it chooses to (``resume``)."""

    process: subprocess.Popen[bytes]
    config_path: Path
    listen: int
    admin: int
    stderr_path: Path
    _out: bytearray = field(default_factory=bytearray)
    _reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen}"

    def unread_bytes(self) -> int:
        """Bytes waiting in the stdout pipe (a full pipe holds 64 KiB on Linux)."""
        assert self.process.stdout is not None
        buffer = bytearray(4)
        fcntl.ioctl(self.process.stdout.fileno(), termios.FIONREAD, buffer)
        return int.from_bytes(buffer, sys.byteorder)

    def resume(self) -> None:
        """Start reading stdout, to its end, in a thread."""
        if self._reader is None:
            stdout = self.process.stdout
            assert stdout is not None
            self._reader = threading.Thread(target=lambda: self._out.extend(stdout.read()), daemon=True)
            self._reader.start()

    def stop(self) -> tuple[int, str, str]:
        """SIGTERM, wait for the exit; ``(exit code, all of stdout, stderr)``."""
        self.resume()
        code = stop(self.process)
        assert self._reader is not None
        self._reader.join(10)
        return code, self._out.decode(), self.stderr_path.read_text()


@contextlib.contextmanager
def piped_gateway(tmp_path: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> Iterator[PipedGateway]:
    listen, admin = free_port(), free_port()
    config = {**config, "listen": f"127.0.0.1:{listen}", "admin": f"127.0.0.1:{admin}"}
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(config_path), "--workers", "1"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
    gw = PipedGateway(process, config_path, listen, admin, stderr_path)
    try:
        wait_http(f"http://127.0.0.1:{admin}/readyz", process=process)
        yield gw
    finally:
        if process.poll() is None:
            gw.stop()
        if process.stdout is not None:
            process.stdout.close()


def parse(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]  # every line is one JSON object


async def load(url: str, count: int) -> tuple[list[int], list[float], list[str]]:
    """``count`` GETs, ``CONCURRENCY`` at a time: statuses, latencies and request ids."""
    statuses: list[int] = []
    latencies: list[float] = []
    ids: list[str] = []
    slots = asyncio.Semaphore(CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=5)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        async with slots:
            started = time.monotonic()
            async with session.get(f"{url}/anything/{i}") as response:
                await response.read()
                statuses.append(response.status)
                ids.append(response.headers["x-request-id"])
            latencies.append(time.monotonic() - started)

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(one(session, i) for i in range(count)))
    return statuses, latencies, ids


@pytest.mark.parametrize(
    ("queue_bytes", "expect_drops"),
    [(None, False), ("65536", True)],
    ids=["default-queue-holds-all", "small-queue-drops"],
)
async def test_a_stdout_nobody_reads_never_stalls_requests(
    tmp_path: Path, upstream_a: int, queue_bytes: str | None, expect_drops: bool
) -> None:
    config = {
        "service": "shop",
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "cluster": "c"}],
        "clusters": [{"name": "c", "endpoints": [f"127.0.0.1:{upstream_a}"]}],
    }
    env = {"MESHGATE_LOG_QUEUE_BYTES": queue_bytes} if queue_bytes else None
    with piped_gateway(tmp_path, config, env) as gw:
        started = time.monotonic()
        statuses, latencies, ids = await load(gw.url, REQUESTS)
        elapsed = time.monotonic() - started
        stuck = gw.unread_bytes()
        await asyncio.sleep(0.3)  # a round of the writer's thread: nothing more fits
        assert gw.unread_bytes() == stuck
        page = await asyncio.to_thread(scrape, gw.admin)
        dropped_metric = metric_sum(page, "meshgate_log_lines_dropped_total")
        gw.resume()
        code, stdout, stderr = await asyncio.to_thread(gw.stop)

    assert statuses == [200] * REQUESTS
    assert max(latencies) < 1.0, max(latencies)
    assert elapsed < 60, elapsed
    assert stuck >= 48_000  # the pipe was (all but) full the whole time: ~150 access lines of 3000
    assert code == 0
    assert stderr == ""
    records = parse(stdout)
    access = [r for r in records if r["event"] == "request"]
    drops = [r for r in records if r["event"] == "log_lines_dropped"]
    assert {r["request_id"] for r in access} <= set(ids)
    assert len(access) + sum(r["count"] for r in drops) == REQUESTS  # written, or counted in a drop line
    # Nothing is dropped once stdout moves again, so the scrape taken while it was stuck saw the whole count.
    assert dropped_metric == sum(r["count"] for r in drops)
    if expect_drops:
        assert drops
        assert all(r["service"] == "shop" and r["level"] == "warning" for r in drops)
    else:
        assert not drops
    assert records[-1]["event"] == "stopped"  # shutdown drained what was queued once stdout moved


def scrape(admin: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as response:
        return str(response.read().decode())


class TruncatingUpstream:
    """Answers every request with a Content-Length it does not honour: the gateway logs ``upstream_body_failed``."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self._server.accept()
                with connection:
                    request = b""
                    while b"\r\n\r\n" not in request:
                        chunk = connection.recv(65536)
                        if not chunk:
                            break
                        request += chunk
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)

    def close(self) -> None:
        self._server.close()


def test_secrets_reach_neither_stdout_nor_stderr(tmp_path: Path, upstream_a: int) -> None:
    truncating = TruncatingUpstream()
    config = {
        "service": "shop",
        "telemetry": {"logs": {"level": "debug"}},
        "routes": [
            {"name": "broken", "match": {"path_prefix": "/broken"}, "cluster": "t"},
            {"name": "all", "match": {"path_prefix": "/"}, "cluster": "c"},
        ],
        "clusters": [
            {"name": "c", "endpoints": [f"127.0.0.1:{upstream_a}"]},
            {"name": "t", "endpoints": [f"127.0.0.1:{truncating.port}"]},
        ],
    }
    query = f"?token={SECRET}-q&access_token={SECRET}-q2"
    headers = f"Authorization: Bearer {SECRET}-token\r\nCookie: session={SECRET}-cookie\r\n"
    try:
        with piped_gateway(tmp_path, config) as gw:
            gw.resume()
            replies = []
            for path in ("/anything/ok", "/broken/body", "/nowhere/../x"):
                request = f"GET {path}{query} HTTP/1.1\r\nHost: shop\r\n{headers}Connection: close\r\n\r\n"
                with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                    replies.append(asyncio.run(raw_http(gw.listen, request.encode()))[0])
            # Malformed: rejected by the parser, logged through the structlog chain with the parser's reason.
            malformed = f"GET /anything{query} HTTP/1.1\r\nHost: shop\r\n{headers}Bad Header: {SECRET}\r\n\r\n"
            replies.append(asyncio.run(raw_http(gw.listen, malformed.encode()))[0])
            time.sleep(0.3)
            code, stdout, stderr = gw.stop()
    finally:
        truncating.close()

    assert replies == [200, 200, 400]  # the truncated body's 200 was sent before the upstream gave out
    assert code == 0
    records = parse(stdout)
    events = [r["event"] for r in records]
    assert "upstream_body_failed" in events  # a warning line logged inside the request
    assert any(r["event"] == "request" and r.get("reason") == "bad_request" for r in records)
    assert len([e for e in events if e == "request"]) == 4
    assert SECRET not in stdout
    assert SECRET not in stderr


def test_a_reload_that_changes_the_level_keeps_logging(tmp_path: Path, upstream_a: int) -> None:
    config: dict[str, Any] = {
        "service": "shop",
        "telemetry": {"logs": {"level": "warning"}},
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "cluster": "c"}],
        "clusters": [{"name": "c", "endpoints": [f"127.0.0.1:{upstream_a}"]}],
    }
    with piped_gateway(tmp_path, config) as gw:
        gw.resume()
        with urllib.request.urlopen(f"{gw.url}/anything/before") as response:
            assert response.status == 200
        reloaded = {**config, "telemetry": {"logs": {"level": "info"}}}
        listen_admin = {"listen": f"127.0.0.1:{gw.listen}", "admin": f"127.0.0.1:{gw.admin}"}
        gw.config_path.write_text(yaml.safe_dump({**reloaded, **listen_admin}, sort_keys=False))
        gw.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{gw.admin}/readyz") as response:
                if json.loads(response.read())["version"] == 2 or time.monotonic() > deadline:
                    break
            time.sleep(0.05)
        with urllib.request.urlopen(f"{gw.url}/anything/after") as response:
            assert response.status == 200
        code, stdout, stderr = gw.stop()
    assert (code, stderr) == (0, "")
    events = [(r["event"], r.get("path")) for r in parse(stdout)]
    assert ("gateway_started", None) not in events  # logged at info while the level was warning
    assert ("request", "/anything/before") in events  # the access log does not depend on the level
    assert ("request", "/anything/after") in events
    assert events[-1] == ("stopped", None)  # info lines show after the reload, through the same writer
