"""A real ``redis-server`` process for integration and e2e tests.

``redis_server()`` starts one on 127.0.0.1 at a free port with a temporary data directory and no persistence, waits
until it answers PING, and stops it by PID on exit. The yielded ``RedisServer`` can also stop, restart (same port),
pause and resume the process, for tests of what the gateway does while Redis is down or hung.

Needs the Debian ``redis-server`` package (``scripts/setup`` installs it); apt starts no daemon, so nothing else
is listening.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config.snapshot import Address
from tests.procs import free_port, terminate

__all__ = ["RedisServer", "ping", "redis_server"]


def ping(port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis on 127.0.0.1:``port`` answers PING (raw RESP, no client library)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    port: int
    dir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.port)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server (again, on the same port and directory) and wait for PING."""
        if self.process is not None and self.process.poll() is None:
            return
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: install the Debian package (scripts/setup does)")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(self.dir),
                    "--daemonize", "no",
                    "--loglevel", "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not ping(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server on port {self.port} did not answer PING within {timeout}s")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server by PID (SIGTERM, then SIGKILL) and wait for it; a no-op when not running."""
        process, self.process = self.process, None
        terminate(process, timeout)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered (a hung Redis)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


@contextmanager
def redis_server(port: int | None = None) -> Iterator[RedisServer]:
    """A running ``redis-server`` on 127.0.0.1 for the duration of the block."""
    with tempfile.TemporaryDirectory(prefix="meshgate-redis-") as tmp:
        server = RedisServer(port or free_port(), Path(tmp))
        server.start()
        try:
            yield server
        finally:
            server.stop()
