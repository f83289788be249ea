"""``RemoteSource`` against a small fake config service on loopback, speaking the documented API (CONTRACT.md
section 7, docs/configservice.md): ETag, ``If-None-Match`` -> 304, ``?wait=`` long-poll, the report headers, bundles
by name. The real service is tested end to end in ``tests/e2e/test_configservice_fleet.py``.

Everything here is real except the service: a real ``SnapshotStore`` with its upstream and policy runtimes, real
files in ``cache_dir``, real sockets.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from gateway.config.bootstrap import Bootstrap, load_config
from gateway.config.sources import bundles
from gateway.config.sources.cache import read_cached
from gateway.config.sources.remote import RemoteSource
from gateway.config.store import SnapshotStore
from gateway.policy_runtime import Policies
from gateway.serving import Serving
from gateway.upstream.clusters import Upstreams
from policy.bundle import build_tarball
from telemetry.metrics import Metrics
from tests.fake_configservice import SERVICE, TOKEN, FakeService, pushed
from tests.procs import free_port

real_store_bundle = bundles.store_bundle


@dataclass
class Gateway:
    bootstrap: Bootstrap
    store: SnapshotStore
    metrics: Metrics
    source: RemoteSource
    upstreams: Upstreams
    policies: Policies

    def rejected(self) -> float:
        return self.metrics.registry.get_sample_value("meshgate_config_reloads_total", {"result": "rejected"}) or 0.0

    def version(self) -> float | None:
        return self.metrics.registry.get_sample_value("meshgate_config_version")

    @property
    def serving(self) -> Serving | None:
        return self.store.current


Start = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def service() -> AsyncIterator[FakeService]:
    fake = FakeService(free_port())
    yield fake
    await fake.stop()


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[Start]:
    started: list[Gateway] = []
    (tmp_path / "gw.token").write_text(f"  {TOKEN}\n")

    async def start(
        url: str, *, startup_wait: float = 2.0, service: str = SERVICE, file: str = "gateway.yaml", **section: Any
    ) -> Gateway:
        document = {
            "service": service,
            "listen": "127.0.0.1:18080",
            "config_service": {"url": url, "token_file": "gw.token", "bundle_refresh": "100ms", **section},
        }
        path = tmp_path / file
        path.write_text(yaml.safe_dump(document))
        bootstrap = load_config(path)
        assert isinstance(bootstrap, Bootstrap)
        metrics = Metrics()
        rng = random.Random(7)
        upstreams = Upstreams(rng, grace=0.1, metrics=metrics)
        policies = Policies(watch_interval=0.05)
        store = SnapshotStore(upstreams, metrics, lambda _: None, policies)
        store.bind(bootstrap.snapshot)
        source = RemoteSource(
            bootstrap, store, rng, startup_wait=startup_wait, backoff_base=0.05, backoff_cap=0.2, hostname="h.x"
        )
        gateway = Gateway(bootstrap, store, metrics, source, upstreams, policies)
        started.append(gateway)
        source.start()
        await asyncio.wait_for(source.first_attempt_done.wait(), startup_wait + 2)
        return gateway

    yield start
    for gateway in started:
        await gateway.source.stop()
        await gateway.upstreams.close()
        await gateway.policies.close()


async def eventually(check: Callable[[], object], within: float = 3.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def routes(gateway: Gateway) -> list[str]:
    assert gateway.serving is not None
    return [route.name for route in gateway.serving.snapshot.routes]


def cache_of(gateway: Gateway) -> Path:
    """The gateway's own part of cache_dir: ``cache_dir/<service>``."""
    return Path(gateway.bootstrap.settings.cache_dir) / gateway.bootstrap.snapshot.service


# --- start-up -------------------------------------------------------------------------------------------------------


async def test_start_up_applies_the_service_version_and_caches_it(service: FakeService, start_gateway: Start) -> None:
    service.push(pushed("a"))
    await service.start()
    gw = await start_gateway(service.url)
    assert gw.serving is not None
    snap = gw.serving.snapshot
    assert (routes(gw), snap.version, snap.source) == (["a"], 1, f"config_service:{service.url}")
    assert gw.version() == 1
    cached = read_cached(cache_of(gw), SERVICE)
    assert cached is not None
    assert (cached.version, cached.etag, cached.pushed, cached.url) == (1, service.etag(1), pushed("a"), service.url)
    merged = json.loads((cache_of(gw) / "config.json").read_text())["config"]
    assert merged["service"] == SERVICE
    assert merged["routes"] == pushed("a")["routes"]
    assert os.stat(cache_of(gw) / "config.json").st_mode & 0o777 == 0o600
    # The next poll reports the applied version, under the default id <service>-<hostname>-<listen port>.
    await eventually(lambda: len(service.polls) >= 2, what="a long-poll")
    poll = service.polls[-1]
    assert poll["X-Meshgate-Gateway"] == "orders-h-18080"
    assert poll["X-Meshgate-Applied-Version"] == "1"
    assert poll["If-None-Match"] == service.etag(1)  # exactly the ETag the service sent
    assert poll["Authorization"] == f"Bearer {TOKEN}"
    assert "X-Meshgate-Rejected-Version" not in poll


async def test_a_push_is_applied_while_long_polling(service: FakeService, start_gateway: Start) -> None:
    service.push(pushed("a"))
    await service.start()
    gw = await start_gateway(service.url, gateway_id="gw-1")
    await eventually(lambda: len(service.polls) >= 2, what="a parked long-poll")
    await asyncio.sleep(0.1)
    pushed_at = time.monotonic()
    service.push(pushed("a", "b"))
    await eventually(lambda: gw.serving is not None and gw.serving.snapshot.version == 2, what="version 2")
    assert time.monotonic() - pushed_at < 1.0
    assert routes(gw) == ["a", "b"]
    await eventually(lambda: service.polls[-1].get("X-Meshgate-Applied-Version") == "2", what="version 2 reported")
    assert service.polls[-1]["X-Meshgate-Gateway"] == "gw-1"


async def test_a_version_that_does_not_compile_is_rejected_and_reported(
    service: FakeService, start_gateway: Start
) -> None:
    service.push(pushed("a"))
    await service.start()
    gw = await start_gateway(service.url)
    with capture_logs() as logs:
        bad = pushed("a")
        bad["routes"][0]["cluster"] = "nope"
        service.push(bad)
        await eventually(lambda: gw.rejected() == 1, what="the rejection counted")
    await eventually(lambda: "X-Meshgate-Rejected-Version" in service.polls[-1], what="the rejection reported")
    poll = service.polls[-1]
    assert poll["X-Meshgate-Rejected-Version"] == "2"
    assert poll["X-Meshgate-Rejected-Error"] == 'routes[0].cluster: unknown cluster "nope"'
    assert poll["X-Meshgate-Applied-Version"] == "1"
    assert poll["If-None-Match"] == service.etag(2)  # not asked again and again
    assert (routes(gw), gw.version()) == (["a"], 1)  # the old version keeps serving
    [event] = [e for e in logs if e["event"] == "config_rejected"]
    assert event["errors"] == [{"path": "routes[0].cluster", "message": 'unknown cluster "nope"'}]
    # A pushed bootstrap-only key is refused the same way.
    service.push({**pushed("a"), "listen": "0.0.0.0:1"})
    await eventually(lambda: gw.rejected() == 2, what="the second rejection")
    # A good version clears the report.
    service.push(pushed("a", "c"))
    await eventually(lambda: gw.version() == 4, what="version 4")
    await eventually(lambda: service.polls[-1].get("X-Meshgate-Applied-Version") == "4", what="version 4 reported")
    assert "X-Meshgate-Rejected-Version" not in service.polls[-1]


async def test_service_down_at_start_serves_the_cache_then_follows_the_service(
    service: FakeService, start_gateway: Start
) -> None:
    service.push(pushed("a"))
    await service.start()
    first = await start_gateway(service.url)
    await first.source.stop()
    await service.stop()

    with capture_logs() as logs:
        gw = await start_gateway(service.url)
    assert gw.serving is not None
    assert (routes(gw), gw.serving.snapshot.version) == (["a"], 1)
    assert gw.serving.snapshot.source.startswith("cache:")
    assert any(e["event"] == "config_service_unreachable" for e in logs)
    assert any(e["event"] == "config_from_cache" for e in logs)

    service.push(pushed("a", "b"))
    await service.start()
    await eventually(lambda: gw.version() == 2, within=5.0, what="version 2 from the service once it is back")
    assert gw.serving.snapshot.source == f"config_service:{service.url}"


async def test_the_service_confirming_the_cached_version_changes_the_source(
    service: FakeService, start_gateway: Start
) -> None:
    service.push(pushed("a"))
    await service.start()
    first = await start_gateway(service.url)
    await first.source.stop()
    # Slow at start: the cache serves after the bounded wait; the first poll after it confirms version 1.
    await service.stop()
    gw = await start_gateway(service.url, startup_wait=0.3)
    assert gw.serving is not None
    assert gw.serving.snapshot.source.startswith("cache:")
    await service.start()
    await eventually(
        lambda: gw.serving is not None and gw.serving.snapshot.source.startswith("config_service:"),
        within=5.0,
        what="the source to become config_service",
    )
    assert gw.version() == 1


async def test_no_service_and_no_cache_stays_not_ready_until_a_version_arrives(
    service: FakeService, start_gateway: Start
) -> None:
    gw = await start_gateway(service.url, startup_wait=0.5)
    assert gw.serving is None
    await service.start()  # up, but no config for this service yet (404)
    await asyncio.sleep(0.3)
    assert gw.serving is None
    service.push(pushed("a"))
    await eventually(lambda: gw.serving is not None, within=8.0, what="the first version")
    assert routes(gw) == ["a"]


async def test_unreachable_service_backs_off_with_jitter(service: FakeService, start_gateway: Start) -> None:
    with capture_logs() as logs:
        gw = await start_gateway(service.url, startup_wait=0.3)
        await asyncio.sleep(1.0)
    delays = [e["retry_in_s"] for e in logs if e["event"] == "config_service_unreachable" and "retry_in_s" in e]
    # base 0.05 s doubling to a 0.2 s cap, each drawn from [0, ceiling]: a handful of tries, never a busy loop.
    assert 3 <= len(delays) <= 60
    assert all(0 <= d <= 0.2 for d in delays)
    assert len(set(delays)) > 1  # jittered
    assert gw.serving is None


async def test_a_refused_token_is_logged_and_backed_off(
    service: FakeService, start_gateway: Start, tmp_path: Path
) -> None:
    service.push(pushed("a"))
    service.token = "another"
    await service.start()
    with capture_logs() as logs:
        gw = await start_gateway(service.url, startup_wait=0.5)
        await asyncio.sleep(0.5)
    failures = [e for e in logs if e["event"] == "config_service_auth_failed"]
    assert failures
    assert failures[0]["error"] == "HTTP 401: the service refused the gateway token"
    assert failures[0]["token_file"] == str(tmp_path / "gw.token")
    assert TOKEN not in repr(logs)
    assert gw.serving is None
    polls = len(service.polls)
    assert polls < 40  # backed off, not hammering
    # A rotated token is picked up from the file without a restart.
    service.token = "rotated"
    (tmp_path / "gw.token").write_text("rotated\n")
    await eventually(lambda: gw.serving is not None, within=5.0, what="the version after the token rotation")


async def test_a_200_for_the_version_already_taken_is_paced_like_an_early_304(
    service: FakeService, start_gateway: Start
) -> None:
    service.push(pushed("a"))
    service.ignore_if_none_match = True  # every poll answers 200 "1" at once
    await service.start()
    gw = await start_gateway(service.url)
    polls = len(service.polls)
    await asyncio.sleep(1.0)
    # Jittered pauses (0.05 s growing to 5 s): a handful of polls, not the thousands of a busy loop.
    assert len(service.polls) - polls < 20
    assert (routes(gw), gw.version()) == (["a"], 1)


async def test_an_unexpected_error_while_taking_a_version_does_not_stop_the_polls(
    service: FakeService, start_gateway: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service.push(pushed("a"))
    service.bundles["authz"] = make_bundle(tmp_path, "b", "r1")
    await service.start()
    gw = await start_gateway(service.url)
    failures = [OSError(28, "No space left on device")]

    def store_bundle(path: Path, data: bytes) -> bool:
        if failures:
            raise failures.pop()
        return real_store_bundle(path, data)

    monkeypatch.setattr(bundles, "store_bundle", store_bundle)
    with capture_logs() as logs:
        service.push(pushed("a", "b", authz={"bundle": "authz"}))
        # The disk error is logged and the version asked for again, not the poll task's silent end.
        await eventually(lambda: gw.version() == 2, within=5.0, what="version 2 after the disk error")
    assert any(e["event"] == "config_poll_failed" for e in logs)
    assert gw.rejected() == 0


# --- bundles --------------------------------------------------------------------------------------------------------


def make_bundle(tmp_path: Path, allowed_route: str, revision: str) -> bytes:
    src = tmp_path / f"bundle-{revision}"
    src.mkdir()
    (src / ".manifest").write_text(json.dumps({"revision": revision, "roots": ["meshgate"]}))
    (src / "authz.rego").write_text(
        f'package meshgate.authz\n\nimport rego.v1\n\nallow if input.meshgate.route == "{allowed_route}"\n'
    )
    out = tmp_path / f"{revision}.tar.gz"
    build_tarball(src, out)
    return out.read_bytes()


def revision(gw: Gateway) -> str:
    assert gw.serving is not None
    authz = gw.policies.current.authz
    assert authz is not None
    return authz.primary.engine.revision


def bundle_path(gw: Gateway, name: str, data: bytes) -> Path:
    return cache_of(gw) / "bundles" / name / f"{hashlib.sha256(data).hexdigest()}.tar.gz"


def serving_bundle(gw: Gateway) -> str | None:
    assert gw.serving is not None
    assert gw.serving.snapshot.authz is not None
    return gw.serving.snapshot.authz.primary.bundle


async def test_named_bundles_are_downloaded_before_the_version_and_refreshed(
    service: FakeService, start_gateway: Start, tmp_path: Path
) -> None:
    first = service.bundles["authz"] = make_bundle(tmp_path, "a", "r1")
    service.push(pushed("a", authz={"bundle": "authz"}))
    await service.start()
    gw = await start_gateway(service.url)
    assert gw.serving is not None
    # Stored by content, and the snapshot names that exact file.
    path = bundle_path(gw, "authz", first)
    assert serving_bundle(gw) == str(path)
    assert path.read_bytes() == first
    assert revision(gw) == "r1"
    cached = read_cached(cache_of(gw), SERVICE)
    assert cached is not None
    assert cached.bundles == {"authz": hashlib.sha256(first).hexdigest()}
    # Re-fetched with If-None-Match: unchanged bytes are not rewritten.
    inode = path.stat().st_ino
    await eventually(lambda: any(etag for name, etag in service.bundle_gets), what="a conditional bundle GET")
    assert path.stat().st_ino == inode
    # A new bundle is a new file, applied as the same version pointing at it; the old file goes after the apply.
    second = service.bundles["authz"] = make_bundle(tmp_path, "b", "r2")
    with capture_logs() as logs:
        await eventually(lambda: revision(gw) == "r2", within=5.0, what="the new bundle's revision")
        await eventually(lambda: not path.exists(), what="the old bundle file removed")
    assert serving_bundle(gw) == str(bundle_path(gw, "authz", second))
    assert gw.version() == 1  # the config did not change
    assert gw.serving.snapshot.version == 1
    assert [e["version"] for e in logs if e["event"] == "bundles_applied"] == [1]
    assert not any(e["event"] == "policy_reloaded" for e in logs)  # one apply, not the file watcher
    cached = read_cached(cache_of(gw), SERVICE)
    assert cached is not None
    assert cached.bundles == {"authz": hashlib.sha256(second).hexdigest()}


async def test_a_refreshed_bundle_that_does_not_load_is_rejected_and_a_restart_keeps_the_good_one(
    service: FakeService, start_gateway: Start, tmp_path: Path
) -> None:
    good = service.bundles["authz"] = make_bundle(tmp_path, "a", "r1")
    service.push(pushed("a", authz={"bundle": "authz"}))
    await service.start()
    gw = await start_gateway(service.url)
    assert revision(gw) == "r1"
    service.bundles["authz"] = b"not a tarball"
    await eventually(lambda: gw.rejected() == 1, what="the bad bundle rejected")
    # Reported like a bad version: the one serving, with the bundle's problem.
    await eventually(lambda: "X-Meshgate-Rejected-Version" in service.polls[-1], within=5.0, what="the report")
    assert service.polls[-1]["X-Meshgate-Rejected-Version"] == "1"
    assert service.polls[-1]["X-Meshgate-Rejected-Error"].startswith("authz.bundle: ")
    await asyncio.sleep(0.5)  # refreshed a few times more: not rejected again and again
    assert gw.rejected() == 1
    assert (revision(gw), serving_bundle(gw)) == ("r1", str(bundle_path(gw, "authz", good)))
    assert bundle_path(gw, "authz", good).read_bytes() == good
    cached = read_cached(cache_of(gw), SERVICE)
    assert cached is not None
    assert cached.bundles == {"authz": hashlib.sha256(good).hexdigest()}

    # A restart while the service is away serves the cached version with the bundle it was applied with.
    await gw.source.stop()
    await service.stop()
    again = await start_gateway(service.url, startup_wait=0.3)
    assert again.serving is not None
    assert again.serving.snapshot.source.startswith("cache:")
    assert revision(again) == "r1"

    # A fixed bundle is taken, and the report cleared.
    await service.start()
    service.bundles["authz"] = make_bundle(tmp_path, "b", "r3")
    await eventually(lambda: revision(again) == "r3", within=5.0, what="the fixed bundle")
    await eventually(
        lambda: (
            "X-Meshgate-Rejected-Version" not in service.polls[-1]
            and service.polls[-1].get("X-Meshgate-Applied-Version") == "1"
        ),
        within=5.0,
        what="a clean report",
    )
    # The bad and the old files go once the fixed one is applied and cached.
    wanted = [f"{hashlib.sha256(service.bundles['authz']).hexdigest()}.tar.gz"]
    await eventually(
        lambda: sorted(p.name for p in (cache_of(again) / "bundles" / "authz").iterdir()) == wanted,
        what="only the fixed bundle's file left",
    )


# --- one cache directory, several services --------------------------------------------------------------------------


async def test_sidecars_of_two_services_share_cache_dir_without_overwriting_each_other(
    service: FakeService, start_gateway: Start
) -> None:
    payments = FakeService(free_port(), service="payments")
    try:
        service.push(pushed("orders-route"))
        payments.push(pushed("payments-route"))
        await service.start()
        await payments.start()
        # Both bootstraps in one directory: the same default cache_dir (.meshgate-cache next to them).
        orders_gw = await start_gateway(service.url)
        payments_gw = await start_gateway(payments.url, service="payments", file="payments.yaml")
        assert orders_gw.bootstrap.settings.cache_dir == payments_gw.bootstrap.settings.cache_dir
        await orders_gw.source.stop()
        await payments_gw.source.stop()
        await service.stop()
        await payments.stop()
        # Restarted with both services away: each serves its own last version from the cache.
        orders_again = await start_gateway(service.url, startup_wait=0.3)
        payments_again = await start_gateway(payments.url, startup_wait=0.3, service="payments", file="payments.yaml")
        assert routes(orders_again) == ["orders-route"]
        assert routes(payments_again) == ["payments-route"]
    finally:
        await payments.stop()


async def test_a_cache_from_another_service_url_is_served_with_a_warning(
    service: FakeService, start_gateway: Start
) -> None:
    service.push(pushed("a"))
    await service.start()
    first = await start_gateway(service.url)
    await first.source.stop()
    await service.stop()
    moved = f"http://127.0.0.1:{free_port()}"
    with capture_logs() as logs:
        gw = await start_gateway(moved, startup_wait=0.3)
    assert routes(gw) == ["a"]
    [warning] = [e for e in logs if e["event"] == "config_cache_other_url"]
    assert (warning["cached_url"], warning["url"], warning["log_level"]) == (service.url, moved, "warning")


# --- ETags ----------------------------------------------------------------------------------------------------------


async def test_a_restored_store_numbering_back_to_the_held_version_is_taken(
    service: FakeService, start_gateway: Start
) -> None:
    service.push(pushed("a"))
    service.push(pushed("a", "b"))
    await service.start()
    gw = await start_gateway(service.url)
    assert (routes(gw), gw.version()) == (["a", "b"], 2)
    await eventually(lambda: service.polls[-1].get("If-None-Match") == service.etag(2), what="a parked poll")
    # Wiped and pushed to again: version 2 once more, other content. The tag tells them apart.
    service.restore([pushed("x"), pushed("x", "y")])
    await eventually(lambda: routes(gw) == ["x", "y"], within=5.0, what="the restored store's version 2")
    assert gw.version() == 2
    await eventually(lambda: service.polls[-1].get("If-None-Match") == service.etag(2), what="the new tag sent")


async def test_a_missing_bundle_rejects_the_version(service: FakeService, start_gateway: Start) -> None:
    service.push(pushed("a"))
    await service.start()
    gw = await start_gateway(service.url)
    service.push(pushed("a", "b", authz={"bundle": "missing"}))
    await eventually(lambda: gw.rejected() == 1, what="the rejection")
    await eventually(lambda: "X-Meshgate-Rejected-Error" in service.polls[-1], what="the report")
    assert (
        service.polls[-1]["X-Meshgate-Rejected-Error"]
        == "authz.bundle: no bundle named 'missing' in the config service"
    )
    assert routes(gw) == ["a"]


async def test_a_bundle_that_does_not_load_rejects_the_version(service: FakeService, start_gateway: Start) -> None:
    service.push(pushed("a"))
    service.bundles["broken"] = b"not a tarball"
    await service.start()
    gw = await start_gateway(service.url)
    service.push(pushed("a", "b", authz={"bundle": "broken"}))
    await eventually(lambda: gw.rejected() == 1, what="the rejection")
    assert routes(gw) == ["a"]
    await eventually(lambda: "X-Meshgate-Rejected-Error" in service.polls[-1], what="the report")
    assert service.polls[-1]["X-Meshgate-Rejected-Error"].startswith("authz.bundle: ")
