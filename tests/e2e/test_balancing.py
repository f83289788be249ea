"""e2e: every load-balancing policy through a real gateway in front of real upstream processes.

One gateway serves the whole module: a route prefix per cluster, a cluster per policy. The upstream names itself in
``x-upstream-instance``, so each test counts where its requests went.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import aiohttp
import pytest

from tests.procs import UPSTREAM_SCRIPT, Gateway, free_port, gateway, stop, wait_http

pytestmark = pytest.mark.e2e

SLOW_MS = 100  # the slow instance's extra latency on every request


class Upstream:
    """An examples/upstream.py process with options ``tests.procs.upstream`` does not take (host, delay)."""

    def __init__(self, name: str, port: int, host: str = "127.0.0.1", delay_ms: int = 0) -> None:
        self.name, self.port, self.host = name, port, host
        command = [sys.executable, str(UPSTREAM_SCRIPT), "--host", host, "--port", str(port), "--name", name]
        self.process = subprocess.Popen(
            [*command, "--delay-ms", str(delay_ms)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    @property
    def url(self) -> str:
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"


def resolve_localhost() -> list[str]:
    """The addresses ``localhost`` resolves to here: 127.0.0.1, and ::1 on hosts that list it too."""
    infos = socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)
    return sorted({str(sockaddr[0]) for *_, sockaddr in infos})


@pytest.fixture(scope="module")
def extra_upstreams() -> Iterator[dict[str, Any]]:
    """A third fast instance ``c``, a ``slow`` one, and one instance per address of ``localhost`` on one port."""
    dns_port = free_port()
    dns_hosts = resolve_localhost()
    started = [Upstream("c", free_port()), Upstream("slow", free_port(), delay_ms=SLOW_MS)]
    started += [Upstream(f"dns-{host}", dns_port, host=host) for host in dns_hosts]
    try:
        for upstream in started:
            wait_http(f"{upstream.url}/healthz", process=upstream.process)
        yield {"c": started[0].port, "slow": started[1].port, "dns_port": dns_port, "dns_hosts": dns_hosts}
    finally:
        for upstream in started:
            stop(upstream.process)


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, upstream_a: int, upstream_b: int, extra_upstreams: dict[str, Any]
) -> Iterator[Gateway]:
    a, b = f"127.0.0.1:{upstream_a}", f"127.0.0.1:{upstream_b}"
    c, slow = f"127.0.0.1:{extra_upstreams['c']}", f"127.0.0.1:{extra_upstreams['slow']}"
    clusters: list[dict[str, Any]] = [
        {"name": "rr", "endpoints": [a, b], "lb": "round_robin"},
        {
            "name": "wrr",
            "endpoints": [{"address": a, "weight": 3}, {"address": b, "weight": 1}],
            "lb": "weighted_round_robin",
        },
        {"name": "rand", "endpoints": [a, b], "lb": "random"},
        {"name": "lr", "endpoints": [a, slow], "lb": "least_request"},
        {"name": "ewma", "endpoints": [a, slow], "lb": "peak_ewma"},
        {"name": "rh-header", "endpoints": [a, b, c], "lb": "ring_hash", "hash_on": "header:x-user"},
        {"name": "rh-cookie", "endpoints": [a, b, c], "lb": "ring_hash", "hash_on": "cookie:session"},
        {"name": "rh-client", "endpoints": [a, b, c], "lb": "ring_hash"},  # hash_on: client (the default)
        {"name": "dns", "discovery": {"dns": f"localhost:{extra_upstreams['dns_port']}", "refresh": "1s"}},
    ]
    routes = [
        {"name": cluster["name"], "match": {"path_prefix": f"/{cluster['name']}/"}, "cluster": cluster["name"]}
        for cluster in clusters
    ]
    config = {"service": "balancing", "routes": routes, "clusters": clusters}
    with gateway(tmp_path_factory.mktemp("balancing"), config) as running:
        yield running


async def instances(
    gw: Gateway,
    cluster: str,
    count: int,
    *,
    concurrency: int = 1,
    headers: Mapping[str, str] | None = None,
    local_host: str | None = None,
) -> list[str]:
    """Send ``count`` requests to ``cluster``'s route; the answering instance of each, in completion order."""
    connector = aiohttp.TCPConnector(local_addr=(local_host, 0) if local_host else None)
    answered: list[str] = []
    async with aiohttp.ClientSession(connector=connector) as session:
        remaining = count

        async def client() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                async with session.get(f"{gw.url}/{cluster}/x", headers=headers) as response:
                    await response.read()
                    assert response.status == 200, (cluster, response.status)
                    answered.append(response.headers["x-upstream-instance"])

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return answered


async def test_round_robin_alternates(gw: Gateway) -> None:
    answered = await instances(gw, "rr", 20)
    assert Counter(answered) == {"a": 10, "b": 10}
    assert all(first != second for first, second in itertools.pairwise(answered)), answered


async def test_weighted_round_robin_follows_the_weights(gw: Gateway) -> None:
    answered = Counter(await instances(gw, "wrr", 400, concurrency=8))
    assert answered.keys() == {"a", "b"}
    assert 0.73 <= answered["a"] / 400 <= 0.77, answered  # weights 3:1 -> 75% +- 2%


async def test_random_spreads_roughly_evenly(gw: Gateway) -> None:
    answered = Counter(await instances(gw, "rand", 400, concurrency=8))
    assert answered.keys() == {"a", "b"}
    assert 0.35 <= answered["a"] / 400 <= 0.65, answered  # 6 standard deviations either side of 50%


async def test_least_request_avoids_the_slow_instance_under_load(gw: Gateway) -> None:
    # Requests pile up on the slow instance, so it loses nearly every in-flight comparison.
    answered = Counter(await instances(gw, "lr", 300, concurrency=8))
    assert answered["a"] / 300 >= 0.8, answered


async def test_peak_ewma_prefers_the_fast_instance(gw: Gateway) -> None:
    # One request at a time, so in-flight counts are always equal: only a latency estimate tells the two apart.
    answered = Counter(await instances(gw, "ewma", 100))
    assert answered["a"] >= 90, answered
    # The control: least_request over the same two instances and the same load sees only ties and splits at random.
    control = Counter(await instances(gw, "lr", 20))
    assert control["slow"] >= 3, control  # P(fewer than 3 of 20 on a fair coin) = 0.0002


def assert_sticky_and_spread(seen: Mapping[str, set[str]]) -> None:
    assert all(len(answered) == 1 for answered in seen.values()), seen  # each key always lands on one instance
    assert len(set().union(*seen.values())) >= 2, seen  # and different keys spread over the instances


async def test_ring_hash_on_a_header(gw: Gateway) -> None:
    seen: dict[str, set[str]] = {}
    for user in (f"user-{n}" for n in range(20)):
        seen[user] = set(await instances(gw, "rh-header", 4, headers={"x-user": user}))
    assert_sticky_and_spread(seen)


async def test_ring_hash_on_a_cookie(gw: Gateway) -> None:
    seen: dict[str, set[str]] = {}
    for session in (f"s{n}" for n in range(20)):
        cookie = f"theme=dark; session={session}; lang=en"  # the other cookies change nothing
        seen[session] = set(await instances(gw, "rh-cookie", 4, headers={"Cookie": cookie}))
    assert_sticky_and_spread(seen)


async def test_ring_hash_on_the_client_address(gw: Gateway) -> None:
    seen: dict[str, set[str]] = {}
    # Linux routes all of 127.0.0.0/8 to loopback: each source address is a different client to the gateway.
    for client in (f"127.0.0.{n}" for n in range(10, 30)):
        seen[client] = set(await instances(gw, "rh-client", 3, local_host=client))
    assert_sticky_and_spread(seen)


async def test_dns_discovery_serves_traffic(gw: Gateway, extra_upstreams: dict[str, Any]) -> None:
    hosts, port = extra_upstreams["dns_hosts"], extra_upstreams["dns_port"]
    answered = Counter(await instances(gw, "dns", 20, concurrency=4))
    assert set(answered) <= {f"dns-{host}" for host in hosts}, answered
    async with aiohttp.ClientSession() as session, session.get(f"{gw.admin_url}/status/upstreams") as response:
        status = await response.json()
    listed = {endpoint["address"] for endpoint in status["dns"]["endpoints"]}
    assert listed == {f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host in hosts}
