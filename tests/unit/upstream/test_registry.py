"""Registry discovery without sockets: the answer parser, the watch loop over a scripted ``fetch``, the watcher over a
fake instance source, and a ``ClusterRuntime`` following that source (the same reconcile as DNS discovery)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from structlog.testing import capture_logs

from gateway.config.snapshot import LB_POLICIES, Address, Cluster, EndpointSpec, LbPolicy, RegistryDiscovery
from gateway.upstream import clusters as clusters_module
from gateway.upstream.clusters import ClusterRuntime, Upstreams
from gateway.upstream.registry import InstanceList, RegistryClient, RegistryError, RegistryWatcher, parse_instances
from telemetry.metrics import Metrics

A, B, C = (Address(f"10.0.0.{i}", 8080) for i in (1, 2, 3))
V6 = Address("::1", 9000)
SPEC = RegistryDiscovery("orders")


async def until(condition: Callable[[], bool]) -> None:
    """Let the watcher task run until ``condition`` holds (2 s at most)."""
    async with asyncio.timeout(2.0):
        while not condition():  # noqa: ASYNC110 - the state polled is plain attributes, no event to wait on
            await asyncio.sleep(0.002)


def body(*addresses: str, version: int = 1) -> dict[str, object]:
    return {
        "version": version,
        "instances": [{"id": f"i{n}", "address": a, "expires_at": 0} for n, a in enumerate(addresses)],
    }


# ---- parse_instances ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (body(version=0), InstanceList(0, ())),
        # sorted by (host, port), duplicates folded: the balancer sees a stable order
        (body("10.0.0.3:8080", "10.0.0.1:8080", "10.0.0.3:8080", version=7), InstanceList(7, (A, C))),
        (body("[::1]:9000", "10.0.0.2:8080"), InstanceList(1, (B, V6))),
        (
            {
                "version": 2,
                "instances": [{"id": "x", "address": "nope"}, {"id": "y"}, "z", {"address": "10.0.0.1:8080"}],
            },
            InstanceList(
                2,
                (A,),
                (
                    'instance x: invalid address "nope" (expected host:port)',
                    "instance y: no address string",
                    "instance #2: no address string",
                ),
            ),
        ),
    ],
)
def test_parse_instances(answer: object, expected: InstanceList) -> None:
    assert parse_instances(answer) == expected


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ([], "expected a JSON object"),
        ({"instances": []}, "expected an integer version >= 0, got None"),
        ({"version": True, "instances": []}, "expected an integer version >= 0, got True"),
        ({"version": -1, "instances": []}, "expected an integer version >= 0, got -1"),
        ({"version": "3", "instances": []}, "expected an integer version >= 0, got '3'"),
        ({"version": 3}, "expected an instances list"),
        ({"version": 3, "instances": {}}, "expected an instances list"),
    ],
)
def test_parse_instances_rejects_a_bad_envelope(answer: object, message: str) -> None:
    with pytest.raises(RegistryError) as info:
        parse_instances(answer)
    assert str(info.value) == message


# ---- RegistryClient.watch over a scripted fetch ------------------------------------------------------------------

Step = tuple[str, InstanceList] | None | BaseException


class ScriptedClient(RegistryClient):
    """``fetch`` answers from a script (then hangs, like a long-poll with nothing new); records each call's ETag."""

    def __init__(self, *script: Step, min_interval: float = 0.0) -> None:
        super().__init__(
            "http://cs.invalid", "t", rng=random.Random(1), backoff_base=0.001, backoff_cap=0.002,
            min_interval=min_interval,
        )  # fmt: skip
        self.script = list(script)
        self.calls: list[tuple[str, str | None]] = []

    async def fetch(self, service: str, etag: str | None = None) -> tuple[str, InstanceList] | None:
        self.calls.append((service, etag))
        if not self.script:
            await asyncio.Event().wait()
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step


async def take(watch: AsyncIterator[tuple[Address, ...]], count: int) -> list[tuple[Address, ...]]:
    found: list[tuple[Address, ...]] = []
    async with asyncio.timeout(2.0):
        async for addresses in watch:
            found.append(addresses)
            if len(found) == count:
                break
    return found


async def test_watch_follows_etags_and_yields_only_new_answers() -> None:
    client = ScriptedClient(('"1"', InstanceList(1, (A,))), None, None, ('"2"', InstanceList(2, (A, B))))
    assert await take(client.watch("orders"), 2) == [(A,), (A, B)]
    assert client.calls == [("orders", None), ("orders", '"1"'), ("orders", '"1"'), ("orders", '"1"')]


async def test_watch_yields_an_empty_list_the_registry_answered() -> None:
    client = ScriptedClient(('"1"', InstanceList(1, (A,))), ('"2"', InstanceList(2, ())))
    assert await take(client.watch("orders"), 2) == [(A,), ()]


async def test_failures_yield_nothing_back_off_and_resynchronise_without_an_etag() -> None:
    client = ScriptedClient(
        ('"1"', InstanceList(1, (A,))),
        aiohttp.ClientConnectionError("unreachable"),
        TimeoutError(),
        RegistryError("HTTP 503: busy"),
        ('"4"', InstanceList(4, (A, C))),
    )
    with capture_logs() as logs:
        assert await take(client.watch("orders"), 2) == [(A,), (A, C)]
    # After a failure the next poll has no ETag: answered at once, so the list is fresh the moment the registry is back.
    assert [etag for _, etag in client.calls] == [None, '"1"', None, None, None]
    events = [(e["event"], e.get("failures"), e.get("after_failures")) for e in logs]
    assert events == [
        ("registry_watch_failed", 1, None),
        ("registry_watch_failed", 2, None),
        ("registry_watch_failed", 3, None),
        ("registry_watch_recovered", None, 3),
    ]
    assert [e["error"] for e in logs[:3]] == ["unreachable", "TimeoutError()", "HTTP 503: busy"]
    assert all(0 <= e["retry_in_s"] <= 0.002 for e in logs[:3])


async def test_skipped_instances_are_logged() -> None:
    client = ScriptedClient(('"1"', InstanceList(1, (A,), ("instance x: no address string",))))
    with capture_logs() as logs:
        assert await take(client.watch("orders"), 1) == [(A,)]
    assert [(e["event"], e["skipped"]) for e in logs] == [
        ("registry_instances_skipped", ["instance x: no address string"])
    ]


async def test_polls_are_spaced_by_min_interval_when_answers_come_back_at_once() -> None:
    # A server that ignores the wait answers 304 at once: without the spacing this would be a busy loop.
    client = ScriptedClient(*([None] * 1000), min_interval=0.05)
    watch = client.watch("orders")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await anext(watch)
    assert 2 <= len(client.calls) <= 0.3 / 0.05 + 2
    await watch.aclose()  # type: ignore[attr-defined]


def test_url_quotes_the_service_and_drops_a_trailing_slash() -> None:
    client = RegistryClient("http://cs:7000/", "t")
    assert client.url("orders") == "http://cs:7000/v1/services/orders/instances"
    assert client.url("a/b") == "http://cs:7000/v1/services/a%2Fb/instances"


# ---- RegistryWatcher over a fake source ------------------------------------------------------------------------

END = object()


class FakeRegistry:
    """An in-memory instance source: ``set`` publishes a list to every watcher (and to later ones first thing);
    ``fail``/``end`` make the current watches raise or end."""

    def __init__(self) -> None:
        self.current: dict[str, tuple[Address, ...]] = {}
        self.queues: dict[str, list[asyncio.Queue[object]]] = {}
        self.subscriptions = 0

    @property
    def watching(self) -> int:
        return sum(len(q) for q in self.queues.values())

    async def watch(self, service: str) -> AsyncIterator[tuple[Address, ...]]:
        queue: asyncio.Queue[object] = asyncio.Queue()
        if service in self.current:
            queue.put_nowait(self.current[service])
        self.queues.setdefault(service, []).append(queue)
        self.subscriptions += 1
        try:
            while True:
                item = await queue.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, tuple)
                yield item
        finally:
            self.queues[service].remove(queue)

    def set(self, service: str, *addresses: Address) -> None:
        self.current[service] = addresses
        self._send(service, addresses)

    def fail(self, service: str, error: BaseException) -> None:
        self._send(service, error)

    def end(self, service: str) -> None:
        self._send(service, END)

    def _send(self, service: str, item: object) -> None:
        for queue in self.queues.get(service, []):
            queue.put_nowait(item)


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[Address, ...]] = []

    def __call__(self, addresses: tuple[Address, ...]) -> None:
        self.changes.append(addresses)


def watcher_for(registry: FakeRegistry, on_change: Callable[[tuple[Address, ...]], None]) -> RegistryWatcher:
    return RegistryWatcher(
        SPEC, registry, on_change, upstream="orders-cluster", rng=random.Random(1), restart_base=0.001
    )


def test_offer_reports_changes_only_sorted_and_deduplicated_including_an_empty_list() -> None:
    seen = Recorder()
    watcher = watcher_for(FakeRegistry(), seen)
    assert watcher.addresses is None
    for offered in [(C, A, C), (A, C), (C, A), (), (), (B,)]:
        watcher.offer(offered)
    assert seen.changes == [(A, C), (), (B,)]
    assert watcher.addresses == (B,)


def test_a_failing_on_change_is_offered_the_same_set_again() -> None:
    attempts: list[tuple[Address, ...]] = []

    def flaky(addresses: tuple[Address, ...]) -> None:
        attempts.append(addresses)
        if len(attempts) == 1:
            raise RuntimeError("reconcile failed")

    watcher = watcher_for(FakeRegistry(), flaky)
    with capture_logs() as logs:
        watcher.offer((A,))
    assert watcher.addresses is None
    assert [(e["event"], e["upstream"], e["service"]) for e in logs] == [
        ("registry_on_change_failed", "orders-cluster", "orders")
    ]
    watcher.offer((A,))
    assert attempts == [(A,), (A,)]
    assert watcher.addresses == (A,)


async def test_watcher_follows_the_source_and_restarts_a_watch_that_raises_or_ends() -> None:
    registry, seen = FakeRegistry(), Recorder()
    registry.set("orders", A)
    watcher = watcher_for(registry, seen)
    watcher.start()
    watcher.start()  # idempotent
    async with asyncio.timeout(2.0):
        await watcher.answered()
    registry.set("orders", A, B)
    await until(lambda: len(seen.changes) == 2)
    with capture_logs() as logs:
        registry.fail("orders", RuntimeError("bug in a source"))
        await until(lambda: registry.subscriptions == 2 and registry.watching == 1)
        registry.end("orders")
        await until(lambda: registry.subscriptions == 3 and registry.watching == 1)
    assert [e["event"] for e in logs] == ["registry_watch_error", "registry_watch_ended"]
    registry.set("orders", C)
    await until(lambda: len(seen.changes) == 3)
    assert seen.changes == [(A,), (A, B), (C,)]  # a restarted watch's first answer (the same set) is not re-reported
    await watcher.stop()
    assert registry.watching == 0
    await watcher.stop()  # a second stop is harmless


# ---- ClusterRuntime following the registry -----------------------------------------------------------------------


def runtime_for(registry: FakeRegistry | None, spec: Cluster | None = None) -> ClusterRuntime:
    return ClusterRuntime(spec or Cluster("c", registry=SPEC), random.Random(1), Metrics(), registry)


async def test_runtime_endpoints_follow_the_registry_and_keep_their_state() -> None:
    registry = FakeRegistry()
    registry.set("orders", A, B)
    runtime = runtime_for(registry)
    try:
        await runtime.ready()
        assert list(runtime.endpoints) == [str(A), str(B)]
        a, b = runtime.endpoints[str(A)], runtime.endpoints[str(B)]
        b.start()  # a request in flight on b when b expires
        registry.set("orders", A, C)
        await until(lambda: str(C) in runtime.endpoints)
        assert runtime.endpoints[str(A)] is a  # kept: in-flight counts and latency estimates survive
        assert str(B) not in runtime.endpoints
        picked = {runtime.pick(None, 0.0, None) for _ in range(10)}
        assert picked == {a, runtime.endpoints[str(C)]}  # b gets no new requests ...
        b.finish(0.01, now=1.0)  # ... and its in-flight one finishes normally
        registry.set("orders")  # every instance expired: no endpoints, so 503 no_healthy_upstream
        await until(lambda: not runtime.endpoints)
        assert runtime.pick(None, 0.0, None) is None
        assert not runtime.all_tripped(0.0)  # no endpoints is not "circuit open"
    finally:
        await runtime.close()
    assert registry.watching == 0


@pytest.mark.parametrize("lb", LB_POLICIES)
async def test_every_balancer_takes_an_empty_registry_list(lb: LbPolicy) -> None:
    registry = FakeRegistry()
    registry.set("orders")
    runtime = runtime_for(registry, Cluster("c", lb=lb, registry=SPEC))
    try:
        await runtime.ready()
        assert runtime.endpoints == {}
        assert runtime.pick("key", 0.0, None) is None
    finally:
        await runtime.close()


async def test_ready_waits_for_the_first_list_but_not_for_ever(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clusters_module, "_REGISTRY_READY_TIMEOUT", 0.05)
    registry = FakeRegistry()  # knows nothing about "orders" yet: the watch gets no answer
    runtime = runtime_for(registry)
    try:
        with capture_logs() as logs:
            await runtime.ready()
        assert runtime.endpoints == {}
        assert [(e["event"], e["upstream"], e["service"]) for e in logs] == [("registry_not_ready", "c", "orders")]
        registry.set("orders", A)
        await until(lambda: bool(runtime.endpoints))
        with capture_logs() as logs:
            await runtime.ready()  # answered now: returns at once, nothing logged
        assert logs == []
    finally:
        await runtime.close()


async def test_without_a_registry_client_the_cluster_is_empty_and_says_why() -> None:
    with capture_logs() as logs:
        runtime = runtime_for(None)
    try:
        await runtime.ready()
        assert runtime.endpoints == {}
        assert [(e["event"], e["log_level"], e["service"]) for e in logs] == [
            ("registry_client_missing", "error", "orders")
        ]
    finally:
        await runtime.close()


async def test_switching_between_static_and_registry_has_no_gap() -> None:
    registry = FakeRegistry()
    static = Cluster("c", (EndpointSpec(A),))
    upstreams = Upstreams(random.Random(1), grace=0.0, metrics=Metrics(), registry=registry)
    try:
        runtime = (await upstreams.apply({"c": static}))["c"]
        assert list(runtime.endpoints) == [str(A)]
        kept = runtime.endpoints[str(A)]
        # To the registry: the static endpoint serves until the registry's first list replaces it.
        registry.set("orders", A, B)
        again = (await upstreams.apply({"c": Cluster("c", registry=SPEC)}))["c"]
        assert again is runtime  # same pool settings: updated in place
        assert list(runtime.endpoints) == [str(A), str(B)]
        assert runtime.endpoints[str(A)] is kept
        # Back to static: the watch stops.
        await upstreams.apply({"c": Cluster("c", (EndpointSpec(C),))})
        assert list(runtime.endpoints) == [str(C)]
        assert registry.watching == 0
        # A renamed registry service restarts the watch on the new name.
        registry.set("orders-v2", B)
        await upstreams.apply({"c": Cluster("c", registry=RegistryDiscovery("orders-v2"))})
        assert list(runtime.endpoints) == [str(B)]
        assert list(registry.queues) == ["orders", "orders-v2"]
        assert registry.watching == 1
    finally:
        await upstreams.close()
    assert registry.watching == 0
