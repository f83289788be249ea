"""Real processes on loopback for integration and e2e tests: upstream servers and `meshgate run`.

Every helper starts a real OS process, waits for it to answer, and stops it by PID. Nothing here mocks the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_SCRIPT = ROOT / "examples" / "upstream.py"

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str,
    timeout: float = 15.0,
    process: subprocess.Popen[bytes] | None = None,
    context: ssl.SSLContext | None = None,
) -> None:
    """Wait for ``url`` to answer 200; ``context`` verifies an ``https`` server (with the test CA)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:  # answered, but not 200 yet (a 503 /readyz): close its socket
            exc.close()
            last = exc
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s: {last}")


def stop(process: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def terminate(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """Stop a server process by PID: SIGCONT (a paused one cannot act on SIGTERM), SIGTERM, then SIGKILL after
    ``timeout``; a no-op when it is not running. Unlike ``stop``, never raises: for helpers' cleanup paths."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGCONT)
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def upstream(
    name: str = "a",
    port: int | None = None,
    *,
    extra_args: Sequence[str] = (),
    tls_context: ssl.SSLContext | None = None,
) -> Iterator[int]:
    """``examples/upstream.py`` on loopback. With TLS options in ``extra_args``, pass a ``tls_context`` that trusts
    its certificate: readiness is then checked over https."""
    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, str(UPSTREAM_SCRIPT), "--port", str(port), "--name", name, *extra_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        scheme = "https" if tls_context is not None else "http"
        wait_http(f"{scheme}://127.0.0.1:{port}/healthz", process=process, context=tls_context)
        yield port
    finally:
        stop(process)


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    config_path: Path
    log_path: Path
    listen: int
    admin: int
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"

    def logs(self) -> list[dict[str, Any]]:
        import json

        lines = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines

    def write_config(self, config: dict[str, Any]) -> None:
        """Replace the config file atomically (rename), as editors and config management tools do."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        os.replace(tmp, self.config_path)
        self.config = config


def base_config(
    listen: int, admin: int, clusters: list[dict[str, Any]], routes: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "service": "test",
        "listen": f"127.0.0.1:{listen}",
        "admin": f"127.0.0.1:{admin}",
        "routes": routes,
        "clusters": clusters,
    }


@contextmanager
def gateway(
    tmp_path: Path, config: dict[str, Any], *, workers: int = 1, env: dict[str, str] | None = None
) -> Iterator[Gateway]:
    """Start `meshgate run` on the given config; `listen`/`admin` are filled in when absent."""
    config = dict(config)
    listen = int(config["listen"].rsplit(":", 1)[1]) if "listen" in config else free_port()
    admin = int(config["admin"].rsplit(":", 1)[1]) if "admin" in config else free_port()
    config.setdefault("listen", f"127.0.0.1:{listen}")
    config.setdefault("admin", f"127.0.0.1:{admin}")
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(config_path), "--workers", str(workers)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
    gw = Gateway(process, config_path, log_path, listen, admin, config)
    try:
        wait_http(f"{gw.admin_url}/readyz", process=process)
        yield gw
    finally:
        if process.poll() is None:
            stop(process)


def proc_status_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory field of ``/proc/<pid>/status`` in KiB: ``VmRSS`` (resident now) or ``VmHWM`` (peak resident)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


async def read_http_response(
    reader: asyncio.StreamReader, seconds: float = 10.0, *, head: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.x response from ``reader``: ``(status, headers, body)``, header names lower-cased.

    The body is framed by Content-Length, chunked encoding, or the end of the connection; a 1xx, 204 or 304 response
    and the answer to a HEAD (``head=True``) have none (a 100 Continue is returned as such, so the caller can tell
    it from the final response). Reads no further than the response, so the next one on the connection can be read
    after it. Gives up after ``seconds``.
    """
    async with asyncio.timeout(seconds):
        preamble = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = preamble[:-4].decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if head or status < 200 or status in (204, 304):
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, await reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers expected: the empty line after the last chunk
                    return status, headers, bytes(body)
                body += await reader.readexactly(size)
                await reader.readexactly(2)
        return status, headers, await reader.read()


async def raw_http(port: int, request: bytes, seconds: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` byte for byte on a new loopback connection (no client-side normalization or limits) and
    read one response; see ``read_http_response`` (a request starting with ``HEAD`` expects no body back)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await read_http_response(reader, seconds, head=request.startswith(b"HEAD "))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def metric_sum(exposition: str, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples in a Prometheus text exposition whose labels include ``labels`` (0 if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def log_events(gw: Gateway, event: str) -> list[dict[str, Any]]:
    """The gateway's JSON log lines with this ``event`` (a line still being written is skipped)."""
    found = []
    for line in gw.log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            found.append(record)
    return found


def wait_until(fn: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.25, what: str = "") -> T:
    """Call ``fn`` until it returns something truthy, and return that; ``TimeoutError`` after ``timeout`` seconds
    (with the last value, or the last exception ``fn`` raised, in the message)."""
    # The sync twin of ``eventually``, for tests that poll processes from plain functions.
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = fn()
        except Exception as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what or 'condition'} not met within {timeout}s; last: {last!r}")
        time.sleep(interval)


async def eventually(check: Callable[[], Awaitable[T | None]], within: float, what: str) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def children(pid: int) -> dict[int, str]:
    """``{pid: command line}`` of the live children of ``pid``, read from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)", which may itself contain spaces
        if int(fields[1]) == pid and fields[0] != "Z":
            found[int(entry.name)] = cmdline
    return found
