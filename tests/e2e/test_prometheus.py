"""e2e: a real Prometheus scrapes a real gateway, and dashboards' queries work on what it stored.

Prometheus (``tests/prometheus_proc.py``), the gateway and an OTLP receiver (``tests/otlp_receiver.py``) run
together: per-route request rates and a latency quantile come out of PromQL, and the exemplars Prometheus ingested
from the OpenMetrics scrape point at traces the receiver really got, which is what "jump from a latency spike to
its trace" needs.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.otlp_receiver import OtlpHttpReceiver
from tests.procs import free_port, gateway, upstream
from tests.prometheus_proc import prometheus_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

ROUTES = ("catalog", "orders")


@pytest.fixture(scope="module")
def upstream_port() -> Iterator[int]:
    with upstream("p") as port:
        yield port


def _traffic(url: str, stop: threading.Event, errors: list[str]) -> None:
    """A few requests per route every 100 ms until ``stop``: rates over several scrapes, not one burst."""
    while not stop.is_set():
        for route in ROUTES:
            try:
                with urllib.request.urlopen(f"{url}/{route}/item", timeout=5) as response:
                    response.read()
            except OSError as exc:
                errors.append(f"{route}: {exc!r}")
        stop.wait(0.1)


def test_prometheus_scrapes_rates_quantiles_and_exemplars(tmp_path: Path, upstream_port: int) -> None:
    admin = free_port()
    receiver = OtlpHttpReceiver()
    config = {
        "service": "scraped",
        "admin": f"127.0.0.1:{admin}",
        "routes": [
            {"name": route, "match": {"path_prefix": f"/{route}/"}, "cluster": "c", "rewrite": {"prefix": "/"}}
            for route in ROUTES
        ],
        "clusters": [{"name": "c", "endpoints": [f"127.0.0.1:{upstream_port}"]}],
        "telemetry": {
            "tracing": {"otlp_endpoint": receiver.endpoint, "sample_ratio": 1.0, "batch": {"delay": "100ms"}}
        },
    }
    # Prometheus before the gateway: its discovery hands targets to the scraper only after ~5 s, which overlaps with
    # the gateway's start and the first traffic instead of adding to them. On the way out the gateway stops first
    # (flushing its last spans to the receiver, still up), then Prometheus, then the receiver.
    with (
        receiver,
        prometheus_server([f"127.0.0.1:{admin}"], tmp_path) as prometheus,
        gateway(tmp_path, config) as gw,
    ):
        stop, errors = threading.Event(), list[str]()
        sender = threading.Thread(target=_traffic, args=(gw.url, stop, errors), daemon=True)
        sender.start()
        try:
            prometheus.wait_scraped(timeout=20)

            def both_routes() -> dict[str, float] | None:
                rows = prometheus.query("sum by (http_route) (rate(http_server_request_duration_seconds_count[30s]))")
                rates = {row["metric"].get("http_route", ""): float(row["value"][1]) for row in rows}
                return rates if all(rates.get(route, 0) > 0 for route in ROUTES) else None

            rates = prometheus.wait_until(both_routes, timeout=20, what="a request rate for both routes")

            def p90() -> float | None:
                rows = prometheus.query(
                    "histogram_quantile(0.9, sum by (le) (rate(http_server_request_duration_seconds_bucket[30s])))"
                )
                value = float(rows[0]["value"][1]) if rows else float("nan")
                return value if value == value and value > 0 else None  # NaN until two samples exist

            quantile = prometheus.wait_until(p90, timeout=10, what="a p90 latency")

            def exemplars() -> list[dict[str, Any]] | None:
                now = time.time()
                series = prometheus.query_exemplars(
                    'http_server_request_duration_seconds_bucket{job="meshgate"}', now - 300, now + 60
                )
                found = [exemplar for item in series for exemplar in item["exemplars"]]
                return found or None

            stored = prometheus.wait_until(exemplars, timeout=15, what="exemplars in Prometheus")
        finally:
            stop.set()
            sender.join(10)
    assert errors == []
    assert set(rates) >= set(ROUTES), rates
    assert 0 < quantile < 1.0, quantile  # a loopback echo is well under a second
    servers = {span.trace_id: span.span_id for span in receiver.spans if span.kind == "SERVER"}
    assert servers, "the receiver got no SERVER spans"
    for exemplar in stored:
        labels = exemplar["labels"]
        assert labels["trace_id"] in servers, (labels, len(servers))
        assert servers[labels["trace_id"]] == labels["span_id"], labels
