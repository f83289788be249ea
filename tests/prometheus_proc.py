"""A real Prometheus server for e2e tests: scrapes gateways' admin ports and answers PromQL.

``prometheus_server(targets, tmp_path)`` writes a ``prometheus.yml`` (job ``meshgate``, the given ``host:port``
targets, ``/metrics``, a 1 s scrape interval), starts ``prometheus`` on 127.0.0.1 at a free port with a temporary
TSDB and exemplar storage on, waits for ``/-/ready`` and stops it by PID on exit. Prometheus scrapes with an
``Accept`` header that prefers OpenMetrics, so the exemplars a gateway renders there are ingested and can be read
back with ``query_exemplars``.

Needs the Debian ``prometheus`` package (``scripts/setup`` installs it); apt starts no daemon that would matter
here, as every instance these tests start has its own port and storage.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.procs import free_port, terminate, wait_until

__all__ = ["Prometheus", "prometheus_server", "wait_until"]

T = TypeVar("T")


class PrometheusError(RuntimeError):
    """The HTTP API answered ``status: error`` (a bad query, for instance)."""


@dataclass
class Prometheus:
    port: int
    dir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.dir / "prometheus.log"

    def api(self, path: str, **params: str | float) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; ``PrometheusError`` when the API reports an error."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode({key: str(value) for key, value in params.items()})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400/422/503 carry the JSON error
            with exc:
                payload = json.loads(exc.read() or b"{}")
        if payload.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {payload.get('errorType')}: {payload.get('error')}")
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query: the result vector, each ``{"metric": {labels}, "value": [ts, "value"]}``."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_exemplars(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        """``/api/v1/query_exemplars``: each ``{"seriesLabels": {...}, "exemplars": [{"labels", "value",
        "timestamp"}]}``."""
        result: list[dict[str, Any]] = self.api("query_exemplars", query=expr, start=start, end=end)
        return result

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets, each with ``health`` and ``lastError`` (for failure messages)."""
        active: list[dict[str, Any]] = self.api("targets")["activeTargets"]
        return active

    def wait_until(self, fn: Callable[[], T | None], timeout: float = 20.0, what: str = "") -> T:
        """``wait_until``, with the scrape targets' state added to the timeout message."""
        try:
            return wait_until(fn, timeout, what=what)
        except TimeoutError as exc:
            try:
                targets = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in self.targets()]
            except (OSError, PrometheusError, KeyError) as detail:
                targets = [("?", "?", repr(detail))]
            raise TimeoutError(f"{exc}; targets: {targets}") from None

    def wait_scraped(self, timeout: float = 20.0) -> None:
        """Until every target has been scraped successfully at least once."""

        def all_up() -> bool:
            up = self.query('up{job="meshgate"}')
            return bool(up) and all(sample["value"][1] == "1" for sample in up)

        self.wait_until(all_up, timeout, what="every target up")

    def start(self, config_path: Path, timeout: float = 20.0) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus not found: install the Debian package (scripts/setup does)")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--enable-feature=exemplar-storage",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}: {self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"prometheus on port {self.port} not ready within {timeout}s: {self._log_tail()}")
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM by PID, then SIGKILL; a no-op when not running."""
        process, self.process = self.process, None
        terminate(process, timeout)

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def write_config(path: Path, targets: list[str], scrape_interval: str = "1s") -> None:
    config = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {
                "job_name": "meshgate",
                "metrics_path": "/metrics",
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


@contextmanager
def prometheus_server(targets: list[str], tmp_path: Path, scrape_interval: str = "1s") -> Iterator[Prometheus]:
    """A running Prometheus scraping ``targets`` (``host:port`` admin addresses) for the duration of the block."""
    directory = tmp_path / "prometheus"
    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "prometheus.yml"
    write_config(config_path, targets, scrape_interval)
    server = Prometheus(free_port(), directory)
    server.start(config_path)
    try:
        yield server
    finally:
        server.stop()
