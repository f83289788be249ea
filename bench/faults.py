"""Resilience under faults: meshgate in front of three real upstreams, under a steady load, while they misbehave.

Run from the repository root::

    python bench/faults.py [--duration 10] [--warmup 2] [--clients 8] [--scenarios kill slow fail restore]

Each scenario starts three ``examples/upstream.py`` processes and one ``meshgate run`` (loopback only), puts
``--clients`` concurrent GET loops on the gateway, injects the fault after ``--warmup`` seconds and keeps the load on
for ``--duration`` more:

``kill``
    SIGKILL one endpoint. Retries (refused / reset) hide it from clients; outlier detection, its breaker and the
    health checks take it out of rotation. Figures: failed requests, time until ``/status/upstreams`` shows it
    ejected and unhealthy.
``slow``
    One endpoint answers after 1 s (``POST /_fault {"mode": "slow"}``). The 100 ms per-try timeout plus a retry on
    another endpoint keep the client latency far below the 1 s route timeout.
``fail``
    Every endpoint answers 503, health checks included. The retry budget caps retries (amplification = upstream
    attempts / client requests), breakers trip and the gateway answers 503 at once. A second cluster on the same
    endpoints with breakers, outlier detection and health checks off shows what the budget alone allows.
``restore``
    Every endpoint down (one killed, two answering 503), then back (the killed one restarted on its port): traffic
    returns to each without restarting the gateway, within the breaker / ejection / health-check bounds.

``tests/e2e/test_faults.py`` runs the same scenarios for a few seconds each and asserts on the figures; the bounds
it asserts are derived from ``Settings``, the timing knobs of the config both use (``config_for``). Results from a
run are in ``bench/RESULTS.md`` ("Resilience under faults").

It prints one line of scenario-specific figures per scenario, then a summary table; the raw figures go to
``--json`` (default ``bench/out/faults.json``, git-ignored). Every process is stopped in a ``finally`` (SIGTERM,
then SIGKILL), on errors and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/faults.py` puts bench/ on the path, not the repository root
    sys.path.insert(0, str(REPO))

from tests.procs import UPSTREAM_SCRIPT, Gateway, free_port, gateway, stop, wait_http  # noqa: E402

__all__ = [
    "APP",
    "BARE",
    "BREAKER_JITTER",
    "HEALTH_JITTER",
    "Figures",
    "Load",
    "Rig",
    "Sample",
    "Settings",
    "StatusLog",
    "Upstream",
    "attempts",
    "config_for",
    "delta",
    "parse_metrics",
    "percentile",
    "rig",
    "scenario_fail",
    "scenario_kill",
    "scenario_restore",
    "scenario_slow",
    "served",
    "total",
    "until",
]

HEALTH_JITTER = 0.1  # gateway/upstream/health.py: each interval is jittered by +-10%
BREAKER_JITTER = 0.1  # gateway/resilience/breaker.py: each trip time is jittered by +-10%
APP = "app"  # the cluster (and route) with every resilience feature on
BARE = "bare"  # the same endpoints with breakers, outlier detection and health checks off: the budget alone
PATH = "/x"  # what the load asks for under each route's prefix (the upstream's JSON echo)
POLL = 0.05  # seconds between two reads of /status/upstreams


# --------------------------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True, slots=True)
class Settings:
    """The timing knobs of the scenarios' gateway config, in seconds; the tests derive their bounds from these."""

    health_interval: float = 0.2
    health_timeout: float = 0.1
    unhealthy_threshold: int = 2
    healthy_threshold: int = 2
    consecutive_failures: int = 3
    open_for: float = 0.5
    max_open_for: float = 1.0
    consecutive_5xx: int = 3
    base_ejection_time: float = 1.0
    max_ejection_time: float = 2.0
    budget_ratio: float = 0.2
    budget_min_per_second: float = 1.0
    budget_window: float = 10.0  # the default; 1 s is one tumbling slot in RetryBudget (see bench/RESULTS.md)
    attempts: int = 3
    per_try_timeout: float = 0.1
    route_timeout: float = 1.0
    slow_ms: int = 1000  # the slow endpoint's delay in the "slow" scenario

    def time_to_unhealthy(self) -> float:
        """Longest time for the health checks to mark a dead endpoint unhealthy: ``unhealthy_threshold`` checks,
        each due within one jittered interval, each failing within ``health_timeout`` (a refused one at once)."""
        return self.unhealthy_threshold * self.health_interval * (1 + HEALTH_JITTER) + self.health_timeout

    def time_to_healthy(self) -> float:
        """Longest time for the health checks to mark a recovered endpoint healthy again."""
        return self.healthy_threshold * self.health_interval * (1 + HEALTH_JITTER) + self.health_timeout

    def time_to_return(self) -> float:
        """Longest time a recovered endpoint stays out of rotation: its breaker's longest trip, its longest
        ejection, or the health checks' healthy threshold, whichever ends last (each starts at the latest when
        the endpoint recovers; under load the breaker's probe goes out as soon as the trip ends)."""
        return max(self.max_open_for * (1 + BREAKER_JITTER), self.max_ejection_time, self.time_to_healthy())


def _ms(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def config_for(settings: Settings, endpoints: Sequence[str]) -> dict[str, Any]:
    """The gateway config of every scenario: route ``/app/`` -> cluster ``app``, ``/bare/`` -> cluster ``bare``."""
    s = settings
    retry = {
        "attempts": s.attempts,
        "per_try_timeout": _ms(s.per_try_timeout),
        "on": ["connect-failure", "refused", "reset", "timeout", "503"],
    }
    budget = {"ratio": s.budget_ratio, "min_per_second": s.budget_min_per_second, "window": _ms(s.budget_window)}
    routes = [
        {
            "name": name,
            "match": {"path_prefix": f"/{name}/"},
            "cluster": name,
            "timeout": _ms(s.route_timeout),
            "retry": retry,
        }
        for name in (APP, BARE)
    ]
    app = {
        "name": APP,
        "endpoints": list(endpoints),
        "lb": "round_robin",
        "connect_timeout": "250ms",
        "circuit_breaker": {
            "consecutive_failures": s.consecutive_failures,
            "open_for": _ms(s.open_for),
            "max_open_for": _ms(s.max_open_for),
        },
        "outlier_detection": {
            "consecutive_5xx": s.consecutive_5xx,
            "base_ejection_time": _ms(s.base_ejection_time),
            "max_ejection_time": _ms(s.max_ejection_time),
        },
        "health_check": {
            "path": "/healthz",
            "interval": _ms(s.health_interval),
            "timeout": _ms(s.health_timeout),
            "unhealthy_threshold": s.unhealthy_threshold,
            "healthy_threshold": s.healthy_threshold,
        },
        "retry_budget": budget,
    }
    bare = {
        "name": BARE,
        "endpoints": list(endpoints),
        "lb": "round_robin",
        "connect_timeout": "250ms",
        "circuit_breaker": {"consecutive_failures": 0},  # per-endpoint breakers off
        "retry_budget": budget,
    }
    return {
        "service": "faults",
        "routes": routes,
        "clusters": [app, bare],
        "limits": {"drain_timeout": "1s"},
        "telemetry": {"logs": {"level": "info", "access_log": False}},
    }


# --------------------------------------------------------------------------------------------------------------
# processes


class Upstream:
    """An ``examples/upstream.py`` process that can be SIGKILLed and started again on the same port."""

    def __init__(self, name: str, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> None:
        command = [sys.executable, str(UPSTREAM_SCRIPT), "--port", str(self.port), "--name", self.name]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self) -> None:
        wait_http(f"{self.url}/healthz", process=self.process)

    async def ready(self) -> None:
        """Wait until it answers /healthz, without blocking the event loop (the load keeps running)."""
        await asyncio.to_thread(self.wait_ready)

    def kill(self) -> None:
        """SIGKILL: no graceful close, in-flight requests are cut, new connections refused."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)

    async def set_fault(self, session: aiohttp.ClientSession, mode: str, delay_ms: int = 1000) -> None:
        async with session.post(f"{self.url}/_fault", json={"mode": mode, "delay_ms": delay_ms}) as response:
            assert response.status == 200, await response.text()

    async def count(self, session: aiohttp.ClientSession, path: str) -> int:
        """Requests this process received for ``path`` (its own count, failed answers included)."""
        async with session.get(f"{self.url}/_count", params={"path": path}) as response:
            return int((await response.json())["count"])


# --------------------------------------------------------------------------------------------------------------
# load


@dataclass(frozen=True, slots=True)
class Sample:
    started: float  # time.monotonic() when the request was sent
    latency: float  # seconds until the whole response was read (or the error)
    status: int  # 0: no HTTP answer
    source: str  # 200: the answering instance; the local reply's error code; "upstream_503"; or the exception

    @property
    def ended(self) -> float:
        return self.started + self.latency


class Load:
    """``clients`` concurrent GET loops on ``url`` from ``async with`` until its end; every request is a Sample."""

    def __init__(self, url: str, clients: int, timeout: float = 5.0) -> None:
        self.url = url
        self.clients = clients
        self.samples: list[Sample] = []
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._running = False
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Load:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.clients), timeout=self._timeout)
        self._running = True
        self._tasks = [asyncio.create_task(self._client(self._session)) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *_: object) -> None:
        self._running = False
        try:
            await asyncio.gather(*self._tasks)
        finally:
            if self._session is not None:
                await self._session.close()

    async def _client(self, session: aiohttp.ClientSession) -> None:
        while self._running:
            started = time.monotonic()
            try:
                async with session.get(self.url) as response:
                    body = await response.read()
                    status = response.status
                    source = response.headers.get("x-upstream-instance", "") if status == 200 else _reason(body)
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, source = 0, type(exc).__name__
            self.samples.append(Sample(started, time.monotonic() - started, status, source))

    def between(self, start: float, end: float = math.inf) -> list[Sample]:
        """The requests sent in ``[start, end)``."""
        return [s for s in self.samples if start <= s.started < end]


def _reason(body: bytes) -> str:
    """What a non-200 answer was: a local reply's ``error`` code, or the upstream's injected 503."""
    try:
        payload = json.loads(body)
    except ValueError:
        return "unparsable"
    if isinstance(payload, dict) and "error" in payload:
        return str(payload["error"])
    if isinstance(payload, dict) and payload.get("fault") == "fail":
        return "upstream_503"
    return "other"


async def until(predicate: Callable[[], bool], seconds: float) -> bool:
    """Check ``predicate`` every ``POLL`` seconds until it holds or ``seconds`` passed; its last value."""
    for _ in range(math.ceil(seconds / POLL)):
        if predicate():
            return True
        await asyncio.sleep(POLL)
    return predicate()


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


# --------------------------------------------------------------------------------------------------------------
# observing the gateway


@dataclass(frozen=True, slots=True)
class EndpointView:
    healthy: bool
    ejected: bool
    breaker: str  # closed | tripped | probing

    @property
    def down(self) -> bool:
        """Taken out of rotation by health checks or outlier detection."""
        return self.ejected or not self.healthy


@dataclass(frozen=True, slots=True)
class StatusEntry:
    at: float  # time.monotonic() when the answer came back
    panic: bool
    endpoints: Mapping[str, EndpointView]  # by address


class StatusLog:
    """``GET /status/upstreams`` every ``POLL`` seconds in the background: the ``app`` cluster's view over time."""

    def __init__(self, session: aiohttp.ClientSession, admin_url: str) -> None:
        self.entries: list[StatusEntry] = []
        self._session = session
        self._url = f"{admin_url}/status/upstreams"
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def read(self) -> StatusEntry:
        async with self._session.get(self._url) as response:
            cluster = (await response.json())[APP]
        views = {
            e["address"]: EndpointView(bool(e["healthy"]), bool(e["ejected"]), str(e["breaker"]))
            for e in cluster["endpoints"]
        }
        return StatusEntry(time.monotonic(), bool(cluster["panic"]), views)

    async def _run(self) -> None:
        while True:
            self.entries.append(await self.read())
            await asyncio.sleep(POLL)

    def first(self, since: float, predicate: Callable[[StatusEntry], bool]) -> float | None:
        """Seconds from ``since`` to the first entry after it where ``predicate`` holds; None if never."""
        for entry in self.entries:
            if entry.at >= since and predicate(entry):
                return entry.at - since
        return None


Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Scrape:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    values: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def total(scrape: Scrape, name: str, **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in scrape.items() if n == name and wanted <= set(ls))


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    """How much ``total(..., name, **labels)`` grew from ``before`` to ``after``."""
    return total(after, name, **labels) - total(before, name, **labels)


def attempts(scrape: Scrape, cluster: str) -> float:
    """Upstream attempts the gateway made to ``cluster`` (every attempt is one histogram observation)."""
    return total(scrape, "http_client_request_duration_seconds_count", upstream=cluster)


def served(scrape: Scrape, route: str) -> float:
    """Client requests the gateway answered on ``route``."""
    return total(scrape, "http_server_request_duration_seconds_count", http_route=route)


# --------------------------------------------------------------------------------------------------------------
# the rig: three upstreams, one gateway, a control session


@dataclass
class Rig:
    upstreams: list[Upstream]
    gateway: Gateway
    control: aiohttp.ClientSession  # fault injection, counts, /metrics, /status/upstreams
    status: StatusLog

    def url(self, route: str) -> str:
        return f"{self.gateway.url}/{route}{PATH}"

    async def scrape(self) -> Scrape:
        async with self.control.get(f"{self.gateway.admin_url}/metrics") as response:
            return parse_metrics(await response.text())

    async def upstream_count(self, route: str) -> int:
        """Requests for ``route`` the live upstreams received, by their own counts."""
        live = [u for u in self.upstreams if u.process is not None and u.process.poll() is None]
        counts = await asyncio.gather(*(u.count(self.control, f"/{route}{PATH}") for u in live))
        return sum(counts)

    async def fault(self, mode: str, upstreams: Sequence[Upstream], delay_ms: int = 1000) -> None:
        await asyncio.gather(*(u.set_fault(self.control, mode, delay_ms) for u in upstreams))


@contextlib.asynccontextmanager
async def rig(workdir: Path, settings: Settings) -> AsyncIterator[Rig]:
    """Three upstreams (a, b, c) and a gateway on ``config_for(settings, ...)``; everything stopped at the end."""
    with contextlib.ExitStack() as stack:
        upstreams = [Upstream(name) for name in "abc"]
        for upstream in upstreams:
            stack.callback(upstream.stop)
            upstream.start()
        for upstream in upstreams:
            upstream.wait_ready()
        config = config_for(settings, [u.address for u in upstreams])
        gw = stack.enter_context(gateway(workdir, config))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as control:
            status = StatusLog(control, gw.admin_url)
            status.start()
            try:
                yield Rig(upstreams, gw, control, status)
            finally:
                await status.stop()


# --------------------------------------------------------------------------------------------------------------
# scenarios


@dataclass
class Figures:
    """What one scenario measured. Latencies are of the client requests in the scenario's measured window."""

    scenario: str
    requests: int  # client requests in the measured window
    failed: int  # of those, answered other than 200 (or not at all)
    p50_ms: float
    p99_ms: float
    max_ms: float
    amplification: float | None = None  # upstream attempts / client requests (gateway metrics), measured window
    time_to_eject_s: float | None = None  # fault -> /status/upstreams shows the endpoint(s) out of rotation
    time_to_recover_s: float | None = None  # restore -> every client request answered 200 again
    extra: dict[str, Any] = field(default_factory=dict)  # scenario-specific figures
    outcomes: dict[str, int] = field(default_factory=dict)  # "status source" -> count, measured window


def _all_tripped(entry: StatusEntry) -> bool:
    return all(v.breaker != "closed" for v in entry.endpoints.values())


def _figures(scenario: str, samples: Sequence[Sample], **kwargs: Any) -> Figures:
    latencies = [s.latency * 1000 for s in samples]
    return Figures(
        scenario,
        requests=len(samples),
        failed=sum(1 for s in samples if s.status != 200),
        p50_ms=round(percentile(latencies, 50), 1),
        p99_ms=round(percentile(latencies, 99), 1),
        max_ms=round(max(latencies, default=math.nan), 1),
        outcomes=dict(Counter(f"{s.status} {s.source}" for s in samples).most_common()),
        **kwargs,
    )


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator else math.nan


def _opt(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


async def scenario_kill(r: Rig, settings: Settings, *, warmup: float, duration: float, clients: int) -> Figures:
    """SIGKILL endpoint c under load. Measured window: from the kill to the end."""
    victim = r.upstreams[2]
    async with Load(r.url(APP), clients) as load:
        await asyncio.sleep(warmup)
        before = await r.scrape()
        killed_at = time.monotonic()
        victim.kill()
        await asyncio.sleep(duration)
    after = await r.scrape()
    last = await r.status.read()
    window = load.between(killed_at)
    return _figures(
        "kill",
        window,
        amplification=_ratio(attempts(after, APP) - attempts(before, APP), served(after, APP) - served(before, APP)),
        time_to_eject_s=_opt(r.status.first(killed_at, lambda e: e.endpoints[victim.address].ejected)),
        extra={
            "time_to_unhealthy_s": _opt(r.status.first(killed_at, lambda e: not e.endpoints[victim.address].healthy)),
            "time_to_down_s": _opt(r.status.first(killed_at, lambda e: e.endpoints[victim.address].down)),
            "requests_before_kill": len(load.between(0, killed_at)),
            "failed_before_kill": sum(1 for s in load.between(0, killed_at) if s.status != 200),
            "retries": delta(before, after, "meshgate_upstream_retries_total", upstream=APP),
            "budget_exhausted": delta(before, after, "meshgate_retry_budget_exhausted_total", upstream=APP),
            "ejections": delta(before, after, "meshgate_outlier_ejections_total", upstream=APP),
            "dead_endpoint_at_end": asdict(last.endpoints[victim.address]),
            "panic_at_end": last.panic,
        },
    )


async def scenario_slow(r: Rig, settings: Settings, *, warmup: float, duration: float, clients: int) -> Figures:
    """Endpoint c turns slow (``settings.slow_ms`` per request) under load. Measured window: from then on."""
    victim = r.upstreams[2]
    async with Load(r.url(APP), clients) as load:
        await asyncio.sleep(warmup)
        before = await r.scrape()
        slowed_at = time.monotonic()
        await r.fault("slow", [victim], settings.slow_ms)
        await asyncio.sleep(duration)
    after = await r.scrape()
    window = load.between(slowed_at)
    healthy = load.between(0, slowed_at)
    timeouts = delta(before, after, "http_client_request_duration_seconds_count", upstream=APP, error_type="timeout")
    return _figures(
        "slow",
        window,
        amplification=_ratio(attempts(after, APP) - attempts(before, APP), served(after, APP) - served(before, APP)),
        time_to_eject_s=_opt(r.status.first(slowed_at, lambda e: e.endpoints[victim.address].ejected)),
        extra={
            "per_try_timeouts": timeouts,
            "budget_exhausted": delta(before, after, "meshgate_retry_budget_exhausted_total", upstream=APP),
            "p99_ms_before_fault": round(percentile([s.latency * 1000 for s in healthy], 99), 1),
            "slow_endpoint_share": round(sum(1 for s in window if s.source == victim.name) / max(len(window), 1), 4),
        },
    )


async def scenario_fail(r: Rig, settings: Settings, *, warmup: float, duration: float, clients: int) -> Figures:
    """Every endpoint answers 503 (health checks too) under load on ``app``; a second load on ``bare`` starts with
    the fault. Measured window: from the fault on; latencies only once every ``app`` breaker has tripped."""
    async with Load(r.url(APP), clients) as load:
        await asyncio.sleep(warmup)
        before = await r.scrape()
        upstream_before = {route: await r.upstream_count(route) for route in (APP, BARE)}
        failed_at = time.monotonic()
        await r.fault("fail", r.upstreams)
        mid: Scrape = {}
        async with Load(r.url(BARE), max(1, clients // 2)) as bare:
            tripped_in: float | None = None
            while time.monotonic() - failed_at < duration:
                await asyncio.sleep(POLL)
                if tripped_in is None:
                    tripped_in = r.status.first(failed_at, _all_tripped)
                    if tripped_in is not None:
                        mid = await r.scrape()  # the breaker gauge while tripped
        after = await r.scrape()
    upstream_after = {route: await r.upstream_count(route) for route in (APP, BARE)}
    tripped_at = failed_at + (tripped_in if tripped_in is not None else duration)
    d_served = {route: served(after, route) - served(before, route) for route in (APP, BARE)}
    gauge = [v for (n, ls), v in mid.items() if n == "meshgate_circuit_breaker_state" and ("upstream", APP) in ls]
    exhausted = total(after, "meshgate_retry_budget_exhausted_total", upstream=BARE)
    return _figures(
        "fail",
        load.between(tripped_at),
        amplification=_ratio(attempts(after, APP) - attempts(before, APP), d_served[APP]),
        time_to_eject_s=_opt(tripped_in),
        extra={
            "time_to_all_tripped_s": _opt(tripped_in),
            "requests_from_fault": len(load.between(failed_at)),
            "p99_ms_from_fault": round(percentile([s.latency * 1000 for s in load.between(failed_at)], 99), 1),
            "breaker_gauge_while_tripped": gauge,
            "amplification_upstream_counts": _ratio(upstream_after[APP] - upstream_before[APP], d_served[APP]),
            "bare_requests": int(d_served[BARE]),
            "bare_amplification": _ratio(attempts(after, BARE), d_served[BARE]),
            "bare_amplification_upstream_counts": _ratio(upstream_after[BARE] - upstream_before[BARE], d_served[BARE]),
            "bare_budget_exhausted": exhausted,
            "bare_p99_ms": round(percentile([s.latency * 1000 for s in bare.samples], 99), 1),
            "bare_outcomes": dict(Counter(f"{s.status} {s.source}" for s in bare.samples).most_common()),
        },
    )


async def scenario_restore(r: Rig, settings: Settings, *, warmup: float, duration: float, clients: int) -> Figures:
    """Endpoint a killed and b, c answering 503 under load until every breaker tripped; then all restored (a
    restarted on its port). Measured window: from the restore on."""
    a, b, c = r.upstreams
    async with Load(r.url(APP), clients) as load:
        await asyncio.sleep(warmup)
        down_at = time.monotonic()
        a.kill()
        await r.fault("fail", [b, c])
        # Until every breaker tripped (bounded: that is not what this scenario measures).
        await until(lambda: r.status.first(down_at, _all_tripped) is not None, 3.0)
        await asyncio.sleep(settings.max_open_for)  # let trips grow to max_open_for: the worst case to come back from
        restored_at = time.monotonic()
        a.start()
        await r.fault("ok", [b, c])
        await a.ready()
        a_up = time.monotonic()
        await asyncio.sleep(duration)
        ended_at = time.monotonic()
    last = await r.status.read()
    window = load.between(restored_at)
    failing = [s for s in window if s.status != 200]
    # Every request sent after this one was answered 200 (measured from the restore).
    recovered = (failing[-1].started - restored_at) if failing else 0.0
    back_since = {a.name: a_up, b.name: restored_at, c.name: restored_at}
    back_in: dict[str, float | None] = {}
    for name, since in back_since.items():
        first = next((s for s in window if s.status == 200 and s.source == name), None)
        back_in[name] = None if first is None else round(max(first.ended - since, 0.0), 3)
    tail = load.between(ended_at - 1.0, ended_at)
    return _figures(
        "restore",
        window,
        time_to_recover_s=round(recovered, 3),
        time_to_eject_s=_opt(r.status.first(down_at, lambda e: all(v.down for v in e.endpoints.values()))),
        extra={
            "requests_while_down": len(load.between(down_at, restored_at)),
            "a_restart_s": round(a_up - restored_at, 3),
            "time_to_first_200_s": _opt(next((s.ended - restored_at for s in window if s.status == 200), None)),
            "time_back_per_endpoint_s": back_in,
            "last_second_requests": len(tail),
            "last_second_failed": sum(1 for s in tail if s.status != 200),
            "last_second_share": {
                name: round(sum(1 for s in tail if s.source == name) / max(len(tail), 1), 3) for name in back_since
            },
            "endpoints_at_end": {address: asdict(view) for address, view in last.endpoints.items()},
            "panic_at_end": last.panic,
        },
    )


class Scenario(Protocol):
    async def __call__(
        self, r: Rig, settings: Settings, *, warmup: float, duration: float, clients: int
    ) -> Figures: ...


SCENARIOS: dict[str, Scenario] = {
    "kill": scenario_kill,
    "slow": scenario_slow,
    "fail": scenario_fail,
    "restore": scenario_restore,
}


# --------------------------------------------------------------------------------------------------------------
# the command


async def run_all(
    names: Sequence[str], settings: Settings, warmup: float, duration: float, clients: int
) -> list[Figures]:
    results: list[Figures] = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"faults-{name}-") as tmp:
            async with rig(Path(tmp), settings) as r:
                print(f"-- {name}: {warmup:g} s warm-up, {duration:g} s with the fault, {clients} clients", flush=True)
                figures: Figures = await SCENARIOS[name](r, settings, warmup=warmup, duration=duration, clients=clients)
            results.append(figures)
            print(details(figures), flush=True)
    return results


def details(f: Figures) -> str:
    """The scenario-specific figures, one Markdown list item."""
    items = [f"{key}={value}" for key, value in f.extra.items() if not isinstance(value, dict | list)]
    items += [f"{key}={json.dumps(value)}" for key, value in f.extra.items() if isinstance(value, dict | list)]
    items.append(f"outcomes={json.dumps(f.outcomes)}")
    return f"- **{f.scenario}**: " + ", ".join(items)


def _cell(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(results: Sequence[Figures]) -> str:
    lines = [
        "| scenario | requests | failed | p50 ms | p99 ms | max ms | amplification | time to eject s |"
        " time to recover s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in results:
        lines.append(
            f"| {f.scenario} | {f.requests:,} | {f.failed:,} | {_cell(f.p50_ms, 1)} | {_cell(f.p99_ms, 1)} |"
            f" {_cell(f.max_ms, 1)} | {_cell(f.amplification)} | {_cell(f.time_to_eject_s)} |"
            f" {_cell(f.time_to_recover_s)} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load with the fault (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the fault (default 2)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent GET loops (default 8)")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "faults.json", help="raw figures")
    args = parser.parse_args(argv)
    settings = Settings()
    started = time.monotonic()
    results = asyncio.run(run_all(args.scenarios, settings, args.warmup, args.duration, args.clients))
    print()
    print(
        f"date {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}, wall time {time.monotonic() - started:.0f} s"
    )
    print(
        f"bounds from the config: unhealthy within {settings.time_to_unhealthy():.2f} s, "
        f"back in rotation within {settings.time_to_return():.2f} s"
    )
    print(f"settings: {json.dumps(asdict(settings))}")
    print()
    print(table(results))
    print()
    print("\n".join(details(f) for f in results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps([asdict(f) for f in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
