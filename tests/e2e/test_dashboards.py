"""e2e: every panel of every Grafana dashboard shows data on the real local stack (``meshgate demo --traffic``).

The test runs the demo (``tests/demo_proc.py``: config service, IdP, two sidecars, the apps, Prometheus on
127.0.0.1:9090 scraping every second, the traffic generator) and adds the control-plane events the traffic does not
make, through the config service's API like an operator would:

- an invalid push (422: counted as ``rejected``, nothing stored);
- a valid orders version the orders sidecar refuses (it changes ``limits``, a restart-only setting): the gateway
  keeps its last good config and counts a rejected reload; then the previous config again, which it applies;
- a payments version with a stingy retry budget, so ``meshgate_retry_budget_exhausted_total`` has samples next to
  the failing payments-b instance (the demo's own budget is generous enough never to run out).

Then it asks Prometheus every panel's query (Grafana's variables filled in as "All") until each returns at least one
finite sample and each query of ``tests.dashboards.EXERCISED`` (denials, authn failures, retries, ejections, 429s,
shadow disagreements, rejected configs, payments-b's 5xx ...) adds up to more than 0, and fails listing each
(dashboard, panel, query) that did not; checks that the config service's series keep the ``service`` they are about
(the control-plane panels group by it); checks that the exemplars Prometheus stored carry 32-hex trace ids (what
Grafana's exemplar link to Jaeger uses); and renders the PNGs with ``scripts/render_dashboards.py`` from those same
queries. Skipped when the ``prometheus`` binary is missing or a port the demo needs (Prometheus's too) is taken.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway.demo.stack import admin_token
from gateway.demo.topology import OPTIONAL_PORTS
from tests.dashboards import EXERCISED, Target, targets
from tests.demo_proc import demo_stack, http, port_in_use
from tests.procs import ROOT, free_port, metric_sum

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

PROMETHEUS = "http://127.0.0.1:9090"
CONFIG_SERVICE = "http://127.0.0.1:7000"
ORDERS_ADMIN = "http://127.0.0.1:9911"
RENDERER = ROOT / "scripts" / "render_dashboards.py"
TRACE_ID = re.compile(r"[0-9a-f]{32}")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

T = TypeVar("T")


def _config_request(method: str, service: str, token: str, config: object = None) -> tuple[int, Any]:
    body = None if config is None else json.dumps(config).encode()
    status, _headers, answer = http(f"{CONFIG_SERVICE}/v1/services/{service}/config", token, method, body)
    return status, json.loads(answer or b"null")


def _config(service: str, token: str) -> dict[str, Any]:
    status, body = _config_request("GET", service, token)
    assert status == 200, body
    config: dict[str, Any] = body["config"]
    return config


def _push(service: str, token: str, config: object) -> tuple[int, Any]:
    return _config_request("PUT", service, token, config)


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


def _query(expr: str) -> list[dict[str, Any]]:
    url = f"{PROMETHEUS}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        data = json.loads(response.read())["data"]
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    result: list[dict[str, Any]] = data["result"]
    return result


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


def shortfall(target: Target) -> str | None:
    """Why the panel would not show what it should right now, or ``None`` when it does.

    Every query needs a sample Grafana would draw (NaN, a quantile of no requests or 0/0, draws nothing); an
    ``EXERCISED`` query needs its (selected) series to add up to more than 0."""
    samples = _query(target.query)
    if not any(math.isfinite(float(sample["value"][1])) for sample in samples):
        return "no data"
    wanted = EXERCISED.get(target.key)
    if wanted is None:
        return None
    total = sum(
        value
        for sample in samples
        if all(re.fullmatch(pattern, sample["metric"].get(label, "")) for label, pattern in wanted.items())
        if math.isfinite(value := float(sample["value"][1]))
    )
    if total > 0:
        return None
    return f"only zeros (sum {total:g} over the series matching {wanted})" if wanted else f"only zeros (sum {total:g})"


def wait_for_every_panel(timeout: float) -> list[str]:
    """Poll until no target falls short; return ``target: why`` for those that still do after ``timeout`` seconds."""
    pending = {target: "not asked yet" for target in targets()}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending = {target: why for target in pending if (why := shortfall(target)) is not None}
        if pending:
            time.sleep(2)
    return [f"{target}\n    {why}" for target, why in pending.items()]


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
    if port_in_use(OPTIONAL_PORTS["Prometheus"]):
        # The demo would run without its own Prometheus, and this test would read someone else's.
        pytest.skip(f"meshgate demo's Prometheus needs port {OPTIONAL_PORTS['Prometheus']}, in use here")
    # Scrapes every second: the 30 s rate windows the queries are asked with fill in sooner.
    with demo_stack(tmp_path, "--traffic", "--scrape-interval", "1s") as demo:
        assert demo.runs("/prometheus/prometheus.yml"), f"the demo runs without its own Prometheus:\n{demo.text()}"
        wait_scraped()
        control_plane_events(admin_token(demo.data))

        short = wait_for_every_panel(timeout=120)
        assert not short, "panels that do not show what the demo makes:\n" + "\n".join(f"  {s}" for s in short)

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
