"""A real ``etcd`` process for integration and e2e tests (the config service's shared store).

``etcd_server()`` starts a single-member etcd on 127.0.0.1 with free client and peer ports and a temporary data
directory, waits until ``/health`` answers ``{"health": "true"}`` (a leader is elected and a read went through Raft),
and stops it by PID on exit. The yielded ``EtcdServer`` can also stop and restart the process (same ports, same data
directory, so the data survives), for tests of what a store does while etcd is down.

Needs the Debian ``etcd-server`` package (``scripts/setup`` installs it); apt starts no daemon, so nothing else is
listening. The member runs with etcd's defaults except where a test needs otherwise: ``--max-request-bytes`` is left
at 1.5 MiB (the limit the etcd store chunks bundles for) and the Raft timings are the defaults, so lease expiry
behaves as in production (the shortest lease etcd grants is then 2 s).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.procs import free_port, terminate

__all__ = ["EtcdServer", "etcd_server", "healthy"]


def healthy(client_port: int, timeout: float = 1.0) -> bool:
    """Whether the etcd on 127.0.0.1:``client_port`` says it is healthy (has a leader and can serve a read)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{client_port}/health", timeout=timeout) as response:
            return bool(json.loads(response.read()).get("health") == "true")
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class EtcdServer:
    client_port: int
    peer_port: int
    dir: Path
    extra_args: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client URL, as ``meshgate configservice --etcd-endpoints`` takes it."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        return self.dir / "etcd.log"

    def start(self, timeout: float = 20.0) -> None:
        """Start the member (again, on the same ports and data directory) and wait until it is healthy."""
        if self.process is not None and self.process.poll() is None:
            return
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError("etcd not found: install the Debian package etcd-server (scripts/setup does)")
        client_url = f"http://127.0.0.1:{self.client_port}"
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    "--name", "meshgate-test",
                    "--data-dir", str(self.data_dir),
                    "--listen-client-urls", client_url,
                    "--advertise-client-urls", client_url,
                    "--listen-peer-urls", peer_url,
                    "--initial-advertise-peer-urls", peer_url,
                    "--initial-cluster", f"meshgate-test={peer_url}",
                    "--initial-cluster-state", "new",
                    "--logger", "zap",
                    "--log-level", "warn",
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not healthy(self.client_port):
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.process.returncode}: {self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"etcd on port {self.client_port} was not healthy within {timeout}s")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the member by PID (SIGTERM, then SIGKILL) and wait for it; a no-op when not running."""
        process, self.process = self.process, None
        terminate(process, timeout)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


@contextmanager
def etcd_server(extra_args: Sequence[str] = ()) -> Iterator[EtcdServer]:
    """A running single-member ``etcd`` on 127.0.0.1 for the duration of the block; ``extra_args`` are appended to
    its command line (e.g. ``["--max-request-bytes", "65536"]``)."""
    with tempfile.TemporaryDirectory(prefix="meshgate-etcd-") as tmp:
        server = EtcdServer(free_port(), free_port(), Path(tmp), tuple(extra_args))
        server.start()
        try:
            yield server
        finally:
            server.stop()
