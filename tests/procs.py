"""Real processes on loopback for integration and e2e tests: upstream servers and `meshgate run`.

Every helper starts a real OS process, waits for it to answer, and stops it by PID. Nothing here mocks the network.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_SCRIPT = ROOT / "examples" / "upstream.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 15.0, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
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


@contextmanager
def upstream(name: str = "a", port: int | None = None) -> Iterator[int]:
    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, str(UPSTREAM_SCRIPT), "--port", str(port), "--name", name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", process=process)
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
