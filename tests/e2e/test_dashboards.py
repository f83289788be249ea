"""e2e: every panel of every Grafana dashboard shows data on the real local stack (``meshgate demo --traffic``).

The test runs ``python -m gateway demo --traffic`` (config service, IdP, two sidecars, the apps, Prometheus on
127.0.0.1:9090), and adds the control-plane events the traffic generator does not make, through the config
service's API like an operator would:

- an invalid push (422: counted as ``rejected``, nothing stored);
- a valid orders version the orders sidecar refuses (it changes ``limits``, a restart-only setting): the gateway
  keeps its last good config and counts a rejected reload; then the previous config again, which it applies;
- a payments version with a stingy retry budget, so ``meshgate_retry_budget_exhausted_total`` has samples next to
  the failing payments-b instance (the demo's own budget is generous enough never to run out).

Then it asks Prometheus every panel's query (Grafana's variables filled in as "All") until each returns at least one
finite sample, and fails listing each (dashboard, panel, query) that did not; checks that the config service's
series keep the ``service`` they are about (the control-plane panels group by it); checks that the exemplars
Prometheus stored carry 32-hex trace ids (what Grafana's exemplar link to Jaeger uses); and renders the PNGs with
``scripts/render_dashboards.py`` from those same queries. Skipped only when the ``prometheus`` binary is missing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from gateway.demo.topology import OPTIONAL_PORTS, PORTS
from tests.dashboards import Target, targets
from tests.procs import ROOT, children, free_port, metric_sum

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PROMETHEUS = "http://127.0.0.1:9090"
CONFIG_SERVICE = "http://127.0.0.1:7000"
ORDERS_ADMIN = "http://127.0.0.1:9911"
RENDERER = ROOT / "scripts" / "render_dashboards.py"
UP_LINE = "meshgate demo is up"
TRACE_ID = re.compile(r"[0-9a-f]{32}")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

T = TypeVar("T")


@dataclass
class Demo:
    process: subprocess.Popen[bytes]
    data: Path
    output: Path

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def admin_token(self) -> str:
        tokens = yaml.safe_load((self.data / "tokens.yaml").read_text())["tokens"]
        return next(str(token["token"]) for token in tokens if token.get("role") == "admin")


def _stop(process: subprocess.Popen[bytes], started: dict[int, str]) -> None:
    """SIGTERM the demo (it stops its children in order), SIGKILL it if it did not finish in time, then stop any of
    ``started`` (its children, by PID and command line, seen while it ran) still alive: the demo starts each child
    in a session of its own, so a demo killed mid-way would leave them running."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
    if process.poll() is None:
        process.kill()
        process.wait()
    for pid, command in started.items():
        if _command(pid) != command:
            continue  # gone (or the PID was reused by something else)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _command(pid) == command and time.monotonic() < deadline:
                time.sleep(0.1)
            if _command(pid) == command:
                os.kill(pid, signal.SIGKILL)


def _command(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None


def _in_use(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def wait_ports_free(timeout: float = 120.0) -> None:
    """The demo's ports are fixed: wait (a bounded while) for another demo on this machine to finish. Prometheus's
    port too: the demo would run without its own and this test would read someone else's."""
    ports = {**PORTS, "Prometheus": OPTIONAL_PORTS["Prometheus"]}
    deadline = time.monotonic() + timeout
    while busy := [f"{what} 127.0.0.1:{port}" for what, port in ports.items() if _in_use(port)]:
        if time.monotonic() > deadline:
            pytest.fail(f"ports still in use after {timeout:g} s (another meshgate demo?): {', '.join(busy)}")
        time.sleep(1)


@contextlib.contextmanager
def demo(tmp_path: Path) -> Iterator[Demo]:
    wait_ports_free()
    data = tmp_path / "demo"
    output = tmp_path / "demo.out"
    command = [sys.executable, "-m", "gateway", "demo", "--data", str(data), "--traffic"]
    help_text = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--help"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    if "--scrape-interval" in help_text:
        command += ["--scrape-interval", "1s"]  # rates over 30 s windows fill in sooner
    with output.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    running = Demo(process, data, output)
    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 90
        while UP_LINE not in running.text():
            started |= children(process.pid)
            if process.poll() is not None:
                pytest.fail(f"meshgate demo exited with {process.returncode}:\n{running.text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"meshgate demo not up within 90 s:\n{running.text()[-3000:]}")
            time.sleep(0.2)
        started |= children(process.pid)
        assert "Prometheus 127.0.0.1:9090" not in running.text(), "the demo runs without its own Prometheus"
        yield running
    finally:
        _stop(process, started)


def _request(method: str, url: str, token: str, body: bytes | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method=method, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read() or b"null")


def _config(service: str, token: str) -> dict[str, Any]:
    status, body = _request("GET", f"{CONFIG_SERVICE}/v1/services/{service}/config", token)
    assert status == 200, body
    config: dict[str, Any] = body["config"]
    return config


def _push(service: str, token: str, config: object) -> tuple[int, Any]:
    return _request("PUT", f"{CONFIG_SERVICE}/v1/services/{service}/config", token, json.dumps(config).encode())


def _wait(what: str, check: Callable[[], T], timeout: float = 30.0) -> T:
    """Call ``check`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.25)
    return value


def _orders_reloads(result: str) -> float:
    with urllib.request.urlopen(f"{ORDERS_ADMIN}/metrics", timeout=5) as response:
        return metric_sum(response.read().decode(), "meshgate_config_reloads_total", result=result)


def wait_scraped(timeout: float = 60.0) -> None:
    """Until Prometheus has scraped every target (both sidecars, the config service) at least once.

    Events before a target's first scrape are invisible to ``increase()``: the push-to-applied histogram would start
    at its final count, and its quantiles over the range would be NaN."""

    def all_up() -> bool:
        up = _query('up{job=~"meshgate.*"}')
        return len(up) >= 3 and all(sample["value"][1] == "1" for sample in up)

    _wait("Prometheus to scrape every target", all_up, timeout)


def control_plane_events(token: str) -> None:
    """The pushes the dashboards' control-plane and retry-budget panels need (see the module docstring)."""
    status, body = _push("orders", token, {"routes": [{"name": "r", "match": {"path": "/r"}, "cluster": "nope"}]})
    assert status == 422, body  # invalid: nothing stored, counted as rejected

    orders = _config("orders", token)
    refused_before = _orders_reloads("rejected")
    status, body = _push("orders", token, {**orders, "limits": {"max_headers": 50}})
    assert status == 201, body  # valid for the config service ...
    _wait("the orders sidecar to refuse the restart-only change", lambda: _orders_reloads("rejected") > refused_before)
    status, body = _push("orders", token, orders)  # ... and back to what it serves: a new version it applies
    assert status == 201, body

    payments = _config("payments", token)
    payments["clusters"] = [
        {**cluster, "retry_budget": {"ratio": 0.05, "min_per_second": 0}} for cluster in payments["clusters"]
    ]
    status, body = _push("payments", token, payments)
    assert status == 201, body


def _query(expr: str) -> list[dict[str, Any]]:
    url = f"{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        data = json.loads(response.read())["data"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    result: list[dict[str, Any]] = data["result"]
    return result


def _has_data(target: Target) -> bool:
    """At least one sample Grafana would draw: NaN (a quantile of no requests, 0/0) draws nothing."""
    return any(math.isfinite(float(sample["value"][1])) for sample in _query(target.query))


def wait_for_every_panel(timeout: float) -> list[Target]:
    """Poll until every target has data; return those that still have none after ``timeout`` seconds."""
    pending = targets()
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = [target for target in pending if not _has_data(target)]
        if pending:
            time.sleep(2)
    return pending


def exemplars() -> list[str]:
    """The trace ids of the request-duration exemplars Prometheus stored over the last five minutes."""
    now = time.time()
    url = f"{PROMETHEUS}/api/v1/query_exemplars?" + urllib.parse.urlencode(
        {"query": "http_server_request_duration_seconds_bucket", "start": now - 300, "end": now}
    )
    with urllib.request.urlopen(url, timeout=10) as response:
        series = json.loads(response.read())["data"]
    return [exemplar["labels"].get("trace_id", "") for item in series or [] for exemplar in item["exemplars"]]


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert header[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def test_every_dashboard_panel_shows_data_on_the_demo_stack(tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("the prometheus binary is not installed (Debian package prometheus; scripts/setup installs it)")
    with demo(tmp_path) as running:
        wait_scraped()
        control_plane_events(running.admin_token())

        empty = wait_for_every_panel(timeout=120)
        assert not empty, "panels with no data:\n" + "\n".join(f"  {target}" for target in empty)

        trace_ids = _wait("exemplars of http_server_request_duration_seconds_bucket", exemplars)
        assert all(TRACE_ID.fullmatch(trace_id) for trace_id in trace_ids), trace_ids[:5]

        out = tmp_path / "img"
        rendered = subprocess.run(
            [sys.executable, str(RENDERER), "--prometheus", PROMETHEUS, "--out", str(out), "--minutes", "3"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert rendered.returncode == 0, rendered.stderr

        # The control-plane panels group the config service's series by the service they are about: a scrape
        # config that lets the target's own `service` label win renames that one to `exported_service`.
        about = {sample["metric"].get("service") for sample in _query("meshgate_configservice_latest_version")}
    names = sorted(path.name for path in out.glob("*.png"))
    assert names == [f"dashboard-{name}.png" for name in ("control-plane", "overview", "policy", "resilience")]
    for path in out.glob("*.png"):
        width, height = _png_size(path)
        assert width >= 1200, (path.name, width, height)
        assert height >= 800, (path.name, width, height)
        assert 30_000 < path.stat().st_size < 5_000_000, (path.name, path.stat().st_size)
    assert about == {"orders", "payments"}, (
        f"meshgate_configservice_latest_version service labels: {about}; the meshgate-configservice scrape job "
        "needs honor_labels: true (compose/prometheus/prometheus.yml)"
    )


def test_the_renderer_says_when_prometheus_is_unreachable(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    result = subprocess.run(
        [sys.executable, str(RENDERER), "--prometheus", f"http://127.0.0.1:{port}", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: cannot reach Prometheus at http://127.0.0.1:{port}"), result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
