"""e2e: under ``--workers`` the admin port's /metrics answers for every worker together, whichever one takes it.

Each worker also serves its own registry on a unix socket in a private directory (named in its ``metrics_socket``
log line); these tests read those pages as the per-worker evidence and compare them with the merged page.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from tests.procs import Gateway, children, eventually, free_port, gateway, log_events, metric_sum

pytestmark = pytest.mark.e2e

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
COUNT = "http_server_request_duration_seconds_count"
REQUESTS = 200


def make_config(endpoint: int, *, traced: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = {
        "service": "test",
        "routes": [{"name": "api", "match": {"path_prefix": "/api"}, "cluster": "main"}],
        "clusters": [{"name": "main", "endpoints": [f"127.0.0.1:{endpoint}"]}],
    }
    if traced:  # every request sampled, so the latency buckets carry exemplars (nothing listens: export just fails)
        config["telemetry"] = {"tracing": {"otlp_endpoint": f"http://127.0.0.1:{free_port()}", "sample_ratio": 1.0}}
    return config


async def worker_sockets(gw: Gateway, workers: int) -> dict[int, str]:
    """``{worker index: socket path}`` once every worker has started."""

    async def check() -> dict[int, str] | None:
        started = len(log_events(gw, "gateway_started")) == workers
        sockets = {e["worker"]: e["path"] for e in log_events(gw, "metrics_socket")}
        return sockets if started and len(sockets) == workers else None

    return await eventually(check, 15.0, f"{workers} workers started")


async def worker_page(path: str, accept: str = "") -> str:
    """One worker's own exposition, read from its unix socket."""
    connector = aiohttp.UnixConnector(path=path)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get("http://worker/metrics", headers={"Accept": accept} if accept else {}) as response,
    ):
        assert response.status == 200
        return await response.text()


def scraper(gw: Gateway) -> Callable[[str], Awaitable[tuple[int, str, str]]]:
    async def scrape(accept: str = "") -> tuple[int, str, str]:
        """A scrape on a NEW connection, so the kernel may hand it to either worker: (status, type, body)."""
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"{gw.admin_url}/metrics", headers={"Accept": accept} if accept else {}) as response,
        ):
            return response.status, response.content_type, await response.text()

    return scrape


async def send_requests(gw: Gateway, count: int) -> None:
    # A new connection per request, so the kernel spreads them over both workers' listeners.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=20)) as session:

        async def fetch() -> int:
            async with session.get(f"{gw.url}/api/x") as response:
                await response.read()
                return response.status

        statuses = Counter(await asyncio.gather(*(fetch() for _ in range(count))))
    assert statuses == {200: count}


async def test_metrics_add_up_over_workers(tmp_path: Path, upstream_a: int) -> None:
    with gateway(tmp_path, make_config(upstream_a, traced=True), workers=2) as gw:
        sockets = await worker_sockets(gw, 2)
        directory = Path(sockets[0]).parent
        assert Path(sockets[1]).parent == directory
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700  # private to the group
        scrape = scraper(gw)
        await send_requests(gw, REQUESTS)

        # A request is recorded just after its response is sent: wait until every one is counted somewhere.
        async def per_worker() -> list[float] | None:
            counts = [metric_sum(await worker_page(sockets[i]), COUNT, http_route="api") for i in (0, 1)]
            return counts if sum(counts) == REQUESTS else None

        counts = await eventually(per_worker, 5.0, f"{REQUESTS} requests counted over the workers")
        assert all(count > 0 for count in counts), counts  # both took traffic: neither page alone says 200

        for _ in range(20):
            status, content_type, text = await scrape("")
            assert (status, content_type) == (200, "text/plain")
            assert metric_sum(text, COUNT, http_route="api") == REQUESTS
            assert metric_sum(text, "http_server_active_requests") == 0
            assert metric_sum(text, "meshgate_config_version") == 1  # a max over workers, not a sum

        worker_pages = [await worker_page(sockets[i], OPENMETRICS) for i in (0, 1)]
        for _ in range(6):
            status, content_type, text = await scrape(f"{OPENMETRICS},text/plain;q=0.5")
            assert (status, content_type) == (200, "application/openmetrics-text")
            assert text.endswith("# EOF\n")
            families = {f.name: f for f in text_string_to_metric_families(text)}  # parses, or raises
            duration = families["http_server_request_duration_seconds"]
            api = [s for s in duration.samples if s.labels.get("http_route") == "api"]
            assert sum(s.value for s in api if s.name == COUNT) == REQUESTS
            assert_exemplars_survive(worker_pages, api)

    assert not directory.exists()  # removed by the supervisor at exit


def assert_exemplars_survive(worker_pages: list[str], merged: list[Any]) -> None:
    """Each bucket with an exemplar on a worker's own page has one on the merged page: the newest of the workers'."""
    newest: dict[tuple[tuple[str, str], ...], Any] = {}
    for page in worker_pages:
        for family in text_string_to_metric_families(page):
            for s in family.samples:
                if s.exemplar is not None and s.labels.get("http_route") == "api":
                    key = tuple(sorted(s.labels.items()))
                    if key not in newest or float(s.exemplar.timestamp) > float(newest[key].timestamp):
                        newest[key] = s.exemplar
    assert newest, "no exemplars on the workers' pages: is tracing sampling every request?"
    merged_exemplars = {tuple(sorted(s.labels.items())): s.exemplar for s in merged if s.exemplar is not None}
    assert merged_exemplars == newest


async def test_a_wedged_worker_makes_the_scrape_fail_not_lie(tmp_path: Path, upstream_a: int) -> None:
    with gateway(tmp_path, make_config(upstream_a), workers=2) as gw:
        await worker_sockets(gw, 2)
        await send_requests(gw, 20)
        workers = [pid for pid, cmd in children(gw.process.pid).items() if "spawn_main" in cmd]
        assert len(workers) == 2
        scrape = scraper(gw)
        os.kill(workers[1], signal.SIGSTOP)
        try:
            # Scrapes handed to the stopped worker wait in its accept queue; those the other takes must not report a
            # partial sum (Prometheus would read the drop as a counter reset): 503, after the 1 s peer timeout.
            answers = await asyncio.gather(*(scrape("") for _ in range(12)), return_exceptions=True)
        finally:
            os.kill(workers[1], signal.SIGCONT)
        answered = [a for a in answers if not isinstance(a, BaseException)]
        assert answered, answers
        for status, _content_type, body in answered:
            assert status == 503
            assert json.loads(body)["error"] == "metrics_incomplete"
        [warning, *_] = log_events(gw, "metrics_peer_unavailable")
        assert warning["level"] == "warning"
        status, _, text = await scraper(gw)("")
        assert status == 200
        assert metric_sum(text, COUNT, http_route="api") == 20
