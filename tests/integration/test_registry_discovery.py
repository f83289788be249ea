"""Registry discovery over HTTP: ``RegistryClient`` against a small fake registry speaking the config service's
documented shape (``{"version", "instances"}``, ``ETag: "K"``, ``If-None-Match`` + ``?wait=`` long-poll, 304), and a
whole in-process gateway whose cluster follows that registry while a load of concurrent requests runs through real
upstream processes (``tests/procs.py``): instances join and expire (TTL) under load without one failed request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from gateway.app import build_pipeline
from gateway.config.bootstrap import read_token
from gateway.config.compile import compile_document
from gateway.config.snapshot import Address, Cluster, RegistryDiscovery
from gateway.config.store import SnapshotStore
from gateway.server import GatewayServer
from gateway.serving import Serving
from gateway.stages.ratelimit import RateLimitStage
from gateway.upstream.clusters import Upstreams
from gateway.upstream.registry import RegistryClient, RegistryWatcher
from telemetry.access_log import AccessLog
from telemetry.metrics import Metrics
from telemetry.tracing import Tracer
from tests.procs import free_port, upstream

TOKEN = "gateway-token"


@dataclass
class FakeRegistry:
    """The config service's instance registry, in memory: TTL heartbeats, expiry, versions, long-poll."""

    instances: dict[str, tuple[str, float]] = field(default_factory=dict)  # id -> (address, expires at, monotonic)
    version: int = 0
    status: int = 200  # anything else: every GET answers it (a registry in trouble)
    polls: list[tuple[str | None, str | None, str | None]] = field(default_factory=list)  # (auth, etag, wait)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, instance: str, address: str, ttl: float) -> None:
        known = self.instances.get(instance)
        self.instances[instance] = (address, time.monotonic() + ttl)
        if known is None or known[0] != address:  # a heartbeat of a known instance changes nothing
            self._bump()

    def delete(self, instance: str) -> None:
        if self.instances.pop(instance, None) is not None:
            self._bump()

    def expire(self) -> None:
        now = time.monotonic()
        gone = [i for i, (_, expires) in self.instances.items() if expires <= now]
        for instance in gone:
            del self.instances[instance]
        if gone:
            self._bump()  # an expiry wakes watchers like a write does

    def _bump(self) -> None:
        self.version += 1
        self.changed.set()
        self.changed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        etag, wait = request.headers.get("If-None-Match"), request.query.get("wait")
        self.polls.append((request.headers.get("Authorization"), etag, wait))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "unauthenticated"}, status=401)
        if self.status != 200:
            return web.json_response({"error": "unavailable"}, status=self.status)
        if etag == f'"{self.version}"':
            if wait is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(float(wait.removesuffix("s"))):
                        await self.changed.wait()
            if etag == f'"{self.version}"':
                return web.Response(status=304, headers={"ETag": etag})
        body = {
            "version": self.version,
            "instances": [
                {"id": i, "address": address, "expires_at": expires} for i, (address, expires) in self.instances.items()
            ],
        }
        return web.json_response(body, headers={"ETag": f'"{self.version}"'})


@dataclass
class Running:
    registry: FakeRegistry
    url: str
    runner: web.AppRunner
    port: int


@pytest.fixture
async def fake_registry() -> AsyncIterator[Running]:
    registry = FakeRegistry()
    app = web.Application()
    app.router.add_get("/v1/services/{service}/instances", registry.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    async def expire() -> None:
        while True:
            registry.expire()
            await asyncio.sleep(0.05)

    expiry = asyncio.create_task(expire())
    try:
        yield Running(registry, f"http://127.0.0.1:{port}", runner, port)
    finally:
        expiry.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await expiry
        await runner.cleanup()


async def next_list(watch: AsyncIterator[tuple[Address, ...]], within: float = 3.0) -> tuple[Address, ...]:
    async with asyncio.timeout(within):
        return await anext(watch)


async def test_client_long_polls_with_the_etag_and_wakes_on_change(fake_registry: Running) -> None:
    registry = fake_registry.registry
    registry.put("a", "127.0.0.1:9001", ttl=60)
    client = RegistryClient(fake_registry.url, TOKEN, wait=5.0, min_interval=0.0)
    watch = client.watch("orders")
    try:
        assert await next_list(watch) == (Address("127.0.0.1", 9001),)
        assert registry.polls == [(f"Bearer {TOKEN}", None, None)]  # the first poll is answered at once
        started = time.monotonic()
        pending = asyncio.ensure_future(next_list(watch))
        await asyncio.sleep(0.3)
        assert not pending.done()  # parked in the long-poll: nothing changed
        registry.put("b", "[::1]:9002", ttl=60)
        assert await pending == (Address("127.0.0.1", 9001), Address("::1", 9002))
        assert time.monotonic() - started < 2.0  # woken by the change, not by the wait's end
        assert registry.polls[1] == (f"Bearer {TOKEN}", '"1"', "5s")
        registry.put("b", "[::1]:9002", ttl=60)  # a heartbeat: no new version, nothing yielded
        registry.delete("a")
        assert await next_list(watch) == (Address("::1", 9002),)
        registry.delete("b")
        assert await next_list(watch) == ()  # an answered empty list is the truth: yielded
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
        await client.close()


async def test_client_keeps_quiet_through_an_outage_and_resyncs_after_it(fake_registry: Running) -> None:
    registry = fake_registry.registry
    registry.put("a", "127.0.0.1:9001", ttl=60)
    client = RegistryClient(fake_registry.url, TOKEN, wait=1.0, min_interval=0.0, backoff_base=0.02, backoff_cap=0.05)
    watch = client.watch("orders")
    try:
        assert await next_list(watch) == (Address("127.0.0.1", 9001),)
        registry.status = 503
        registry.changed.set()  # wake the parked poll: it sees the outage on its next try
        pending = asyncio.ensure_future(next_list(watch, within=10.0))
        await asyncio.sleep(0.5)
        assert not pending.done()  # failures yield nothing: the consumer keeps its last list
        failed = len(registry.polls)
        assert failed >= 4  # retried with backoff, not given up
        registry.status = 200
        registry.put("b", "127.0.0.1:9002", ttl=60)
        assert await pending == (Address("127.0.0.1", 9001), Address("127.0.0.1", 9002))
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
        await client.close()


async def test_a_wrong_token_is_a_failure_not_an_empty_list(fake_registry: Running) -> None:
    fake_registry.registry.put("a", "127.0.0.1:9001", ttl=60)
    client = RegistryClient(fake_registry.url, "wrong", backoff_base=0.01, backoff_cap=0.02)
    watch = client.watch("orders")
    try:
        with pytest.raises(TimeoutError):
            await next_list(watch, within=0.3)
        assert len(fake_registry.registry.polls) >= 2
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
        await client.close()


async def test_a_rotated_token_file_is_used_without_a_restart(fake_registry: Running, tmp_path: Path) -> None:
    fake_registry.registry.put("a", "127.0.0.1:9001", ttl=60)
    token_file = tmp_path / "gw.token"
    token_file.write_text("wrong\n")
    client = RegistryClient(
        fake_registry.url, functools.partial(read_token, token_file), backoff_base=0.01, backoff_cap=0.02
    )
    watch = client.watch("orders")
    pending = asyncio.ensure_future(next_list(watch, within=3.0))
    try:
        await asyncio.sleep(0.2)
        token_file.write_text("")  # mid-rotation: an empty file is a failed poll, never an unauthenticated one
        await asyncio.sleep(0.2)
        assert not pending.done()
        assert len(fake_registry.registry.polls) >= 2
        token_file.write_text(f"{TOKEN}\n")
        assert await pending == (Address("127.0.0.1", 9001),)
    finally:
        pending.cancel()
        await watch.aclose()  # type: ignore[attr-defined]
        await client.close()


async def test_a_restart_without_the_registry_starts_from_the_last_cached_list(
    fake_registry: Running, tmp_path: Path
) -> None:
    registry = fake_registry.registry
    registry.put("a", "127.0.0.1:9001", ttl=60)
    registry.put("b", "127.0.0.1:9002", ttl=60)
    cache = tmp_path / "cache" / "orders"  # the gateway's cache_dir/<service>
    client = RegistryClient(fake_registry.url, TOKEN, wait=1.0, min_interval=0.0, cache_dir=cache)
    watch = client.watch("payments")
    try:
        assert await next_list(watch) == (Address("127.0.0.1", 9001), Address("127.0.0.1", 9002))
        registry.delete("b")
        assert await next_list(watch) == (Address("127.0.0.1", 9001),)
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
        await client.close()
    stored = json.loads((cache / "instances" / "payments.json").read_text())
    assert (stored["addresses"], stored["version"], stored["url"]) == (["127.0.0.1:9001"], 3, fake_registry.url)
    assert [p.name for p in (cache / "instances").iterdir()] == ["payments.json"]  # written by rename: no temp left

    # Restarted while the control plane is unreachable: the watcher is seeded from the cache, not left empty.
    down = RegistryClient(f"http://127.0.0.1:{free_port()}", TOKEN, backoff_base=0.05, backoff_cap=0.1, cache_dir=cache)
    seen: list[tuple[Address, ...]] = []
    watcher = RegistryWatcher(RegistryDiscovery("payments"), down, seen.append, restart_base=0.01)
    try:
        with capture_logs() as logs:
            watcher.start()
            async with asyncio.timeout(2.0):
                await watcher.answered()
            await asyncio.sleep(0.3)  # further failed polls change nothing
        assert seen == [(Address("127.0.0.1", 9001),)]
        assert any(e["event"] == "registry_from_cache" for e in logs)
    finally:
        await watcher.stop()
        await down.close()

    # With the registry answering, its list is the truth from the first poll; the cache is only a fallback.
    registry.put("c", "127.0.0.1:9003", ttl=60)
    again = RegistryClient(fake_registry.url, TOKEN, wait=1.0, min_interval=0.0, cache_dir=cache)
    watch = again.watch("payments")
    try:
        assert await next_list(watch) == (Address("127.0.0.1", 9001), Address("127.0.0.1", 9003))
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
        await again.close()
    assert json.loads((cache / "instances" / "payments.json").read_text())["addresses"] == [
        "127.0.0.1:9001",
        "127.0.0.1:9003",
    ]


# ---- a whole gateway following the registry under load -----------------------------------------------------------

TTL = 1.0


@dataclass
class Instance:
    """A real upstream process and its registration; ``heartbeat`` keeps it alive in the registry."""

    name: str
    cm: AbstractContextManager[int]
    port: int
    beating: bool = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def instances() -> Iterator[dict[str, Instance]]:
    started: dict[str, Instance] = {}
    try:
        for name in ("a", "b", "c"):
            cm = upstream(name)
            started[name] = Instance(name, cm, cm.__enter__())
        yield started
    finally:
        for instance in started.values():
            instance.cm.__exit__(None, None, None)


async def stop_instance(instance: Instance) -> None:
    # SIGTERM: the process stops accepting, answers what it has in flight, then exits (aiohttp's graceful stop).
    await asyncio.to_thread(instance.cm.__exit__, None, None, None)


async def test_instances_join_and_expire_under_load_without_a_failed_request(
    fake_registry: Running, instances: dict[str, Instance]
) -> None:
    registry = fake_registry.registry
    metrics = Metrics()
    rng = random.Random(7)
    # A short backoff cap: the registry outage below must not leave the watch asleep past the next phase.
    client = RegistryClient(fake_registry.url, TOKEN, wait=30.0, backoff_cap=0.5)
    upstreams = Upstreams(rng, grace=0.5, metrics=metrics, registry=client)
    server = GatewayServer(build_pipeline(metrics, rng, AccessLog(), RateLimitStage(metrics), Tracer()), metrics)

    def publish(serving: Serving) -> None:
        server.serving = serving

    store = SnapshotStore(upstreams, metrics, publish)
    port = free_port()
    gateway = f"http://127.0.0.1:{port}"
    # Compiled with a static cluster, then given the registry cluster: the compile rules are unit-tested; this test
    # is about the runtime. No retries: every request gets exactly one attempt, so a failure cannot hide.
    base = compile_document(
        {
            "service": "t",
            "listen": f"127.0.0.1:{port}",
            "routes": [{"name": "all", "cluster": "up"}],
            "clusters": [{"name": "up", "endpoints": ["127.0.0.1:1"]}],
            "telemetry": {"logs": {"access_log": False}},
        }
    )
    snapshot = dataclasses.replace(
        base, clusters={"up": Cluster("up", lb="least_request", registry=RegistryDiscovery("orders"))}
    )

    async def heartbeat() -> None:
        while True:
            for instance in instances.values():
                if instance.beating:
                    registry.put(instance.name, instance.address, TTL)
            await asyncio.sleep(TTL / 4)

    a, b, c = instances["a"], instances["b"], instances["c"]
    a.beating = True
    registry.put("a", a.address, TTL)
    beats = asyncio.create_task(heartbeat())
    await store.apply(snapshot, "test")  # waits for the registry's first list: a serves from the first request
    await server.start("127.0.0.1", port, reuse_port=False)
    runtime = upstreams.live["up"]

    statuses: Counter[int] = Counter()
    failures: list[str] = []
    # The phase a request started in -> instance -> responses. Changes happen in the "...ing" phases; a steady phase
    # starts only once the gateway's endpoints match it, so any request of it landing elsewhere is a bug.
    phase = ["a only"]
    by_phase: dict[str, Counter[str]] = {}
    stop = asyncio.Event()

    async def worker(session: aiohttp.ClientSession, n: int) -> None:
        while not stop.is_set():
            # Some requests take a while, so there are always some in flight when an instance leaves.
            path = "/delay/150" if n % 4 == 0 else f"/anything/{n}"
            current = phase[0]
            try:
                async with session.get(f"{gateway}{path}") as response:
                    text = await response.text()
                    statuses[response.status] += 1
                    if response.status != 200:
                        failures.append(f"{response.status} {path} in {current}: {text}")
                        continue
                    name = json.loads(text)["instance"]  # both /anything and /delay name the instance
                    by_phase.setdefault(current, Counter())[name] += 1
            except aiohttp.ClientError as exc:
                failures.append(f"{exc!r} {path} in {current}")

    async def endpoints_become(*wanted: Instance) -> None:
        expected = {w.address for w in wanted}
        async with asyncio.timeout(5.0):
            while set(runtime.endpoints) != expected:  # noqa: ASYNC110 - polling the runtime is the point
                await asyncio.sleep(0.01)

    async def runs_for(seconds: float, label: str) -> None:
        phase[0] = label
        await asyncio.sleep(seconds)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        workers = [asyncio.create_task(worker(session, n)) for n in range(16)]
        try:
            await runs_for(0.5, "a only")
            # b and c join.
            phase[0] = "joining"
            b.beating = c.beating = True
            registry.put("b", b.address, TTL)
            registry.put("c", c.address, TTL)
            await endpoints_become(a, b, c)
            await runs_for(1.0, "a, b, c")
            # a stops heartbeating: it expires after its TTL, the gateway drops it, then it shuts down.
            phase[0] = "a expiring"
            a.beating = False
            await endpoints_become(b, c)
            await runs_for(0.5, "b, c (a expired)")
            phase[0] = "a stopping"
            await stop_instance(a)
            # The control plane blinks: the registry errors for a while; the gateway keeps b and c.
            registry.status = 503
            registry.changed.set()
            await runs_for(1.0, "b, c (registry down)")
            assert set(runtime.endpoints) == {b.address, c.address}
            registry.status = 200
            # b deregisters (a clean leave) and shuts down once the gateway no longer sends it anything.
            phase[0] = "b leaving"
            b.beating = False
            registry.delete("b")
            await endpoints_become(c)
            await runs_for(0.5, "c only")
            phase[0] = "b stopping"
            await stop_instance(b)
            await runs_for(0.5, "c only (b stopped)")
        finally:
            stop.set()
            await asyncio.gather(*workers)
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
            await server.stop(drain_timeout=1.0)
            await upstreams.close()
            await client.close()

    assert failures == []
    assert sum(statuses.values()) > 200, statuses
    expected = {
        "a only": {"a"},
        "a, b, c": {"a", "b", "c"},
        "b, c (a expired)": {"b", "c"},
        "a stopping": {"b", "c"},
        "b, c (registry down)": {"b", "c"},
        "c only": {"c"},
        "b stopping": {"c"},
        "c only (b stopped)": {"c"},
    }
    assert {label: set(by_phase[label]) for label in expected} == expected, by_phase
