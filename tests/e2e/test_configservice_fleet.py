"""e2e: one config service (SQLite) and two gateways that take their routes, clusters and policy from it.

Everything is a real process: ``meshgate configservice``, two ``meshgate run`` gateways whose bootstrap names the
service, and the demo upstreams. The tests follow the issue's scenarios in order on one fleet (pushes build on each
other), so the module is one story: push, push again, refuse a bad push, roll back, lose the service, restart a
gateway from its cache, then swap a policy bundle.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from policy.bundle import build_tarball
from tests.configservice_proc import GATEWAY_TOKEN, ConfigService, config_service
from tests.procs import Gateway, eventually, gateway

pytestmark = pytest.mark.e2e

SERVICE = "orders"


def pushed(upstream_a: int, upstream_b: int, *routes: str) -> dict[str, Any]:
    """The pushed part: one route per name, `/{name}/` -> cluster `a` (route names starting with b -> `b`)."""
    return {
        "routes": [
            {
                "name": name,
                "match": {"path_prefix": f"/{name}/"},
                "cluster": "b" if name.startswith("b") else "a",
                "rewrite": {"prefix": "/anything/"},
            }
            for name in routes
        ],
        "clusters": [
            {"name": "a", "endpoints": [f"127.0.0.1:{upstream_a}"]},
            {"name": "b", "endpoints": [f"127.0.0.1:{upstream_b}"]},
        ],
    }


def bootstrap(service: ConfigService, tmp: Path, name: str) -> dict[str, Any]:
    token_file = tmp / f"{name}.token"
    token_file.write_text(GATEWAY_TOKEN + "\n")
    return {
        "service": SERVICE,
        "config_service": {
            "url": service.url,
            "token_file": str(token_file),
            "cache_dir": str(tmp / f"{name}-cache"),
            "gateway_id": name,
            "bundle_refresh": "200ms",
        },
    }


class Fleet:
    def __init__(self, service: ConfigService, gateways: list[Gateway], tmp: Path, upstreams: tuple[int, int]) -> None:
        self.service = service
        self.gateways = gateways
        self.tmp = tmp
        self.upstreams = upstreams

    def push(self, *routes: str, extra: dict[str, Any] | None = None) -> int:
        return self.service.push(SERVICE, {**pushed(*self.upstreams, *routes), **(extra or {})})


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, upstream_a: int, upstream_b: int) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    with config_service(tmp / "cs") as service, ExitStack() as stack:
        fleet = Fleet(service, [], tmp, (upstream_a, upstream_b))
        fleet.push("a1")  # a gateway is ready once it serves a version: push before starting them
        for name in ("gw1", "gw2"):
            directory = tmp / name
            directory.mkdir()
            fleet.gateways.append(stack.enter_context(gateway(directory, bootstrap(service, tmp, name))))
        yield fleet


async def status(session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> int:
    async with session.get(url, headers=headers) as response:
        await response.read()
        return response.status


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def all_serve(session: aiohttp.ClientSession, fleet: Fleet, path: str, expected: int, within: float) -> float:
    """Seconds until every gateway answers ``path`` with ``expected``."""
    started = time.monotonic()

    async def check() -> bool:
        codes = [await status(session, f"{gw.url}{path}") for gw in fleet.gateways]
        return all(code == expected for code in codes)

    await eventually(check, within, f"every gateway answering {path} with {expected}")
    return time.monotonic() - started


async def test_both_gateways_serve_the_first_version(fleet: Fleet, session: aiohttp.ClientSession) -> None:
    for gw in fleet.gateways:
        assert await status(session, f"{gw.url}/a1/x") == 200
        async with session.get(f"{gw.admin_url}/readyz") as response:
            ready = await response.json(content_type=None)
        assert (ready["source"], ready["version"]) == ("config_service", 1)


async def test_a_pushed_route_is_served_by_both_within_a_second(fleet: Fleet, session: aiohttp.ClientSession) -> None:
    version = fleet.push("a1", "b1")
    assert version == 2
    assert await all_serve(session, fleet, "/b1/x", 200, within=1.0) < 1.0

    async def reported() -> list[dict[str, Any]] | None:
        _, answer = fleet.service.call("GET", "/v1/gateways")
        mine = [g for g in answer["gateways"] if g["service"] == SERVICE]
        return mine if len(mine) == 2 and all(g["applied_version"] == 2 for g in mine) else None

    gateways = await eventually(reported, 5, "both gateways reporting version 2 as applied")
    assert {g["id"] for g in gateways} == {"gw1", "gw2"}


async def test_pushes_under_load_fail_no_request(fleet: Fleet, session: aiohttp.ClientSession) -> None:
    failures: list[int] = []
    done = 0
    stop = asyncio.Event()

    async def load(gw: Gateway) -> None:
        nonlocal done
        while not stop.is_set():
            code = await status(session, f"{gw.url}/a1/x")
            done += 1
            if code != 200:
                failures.append(code)

    workers = [asyncio.create_task(load(gw)) for gw in fleet.gateways for _ in range(4)]
    try:
        for extra in ("c1", "c2", "c3", "c4", "c5"):  # five versions, each swapped in under the load
            fleet.push("a1", "b1", extra)
            await all_serve(session, fleet, f"/{extra}/x", 200, within=2.0)
            await asyncio.sleep(0.2)  # traffic on each version, not only across the swaps
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert done > 20  # the load really ran through every swap (how much depends on the machine)
    assert failures == []


async def test_an_invalid_push_is_refused_and_nothing_changes(fleet: Fleet, session: aiohttp.ClientSession) -> None:
    _, before = fleet.service.call("GET", f"/v1/services/{SERVICE}/versions")
    bad = pushed(*fleet.upstreams, "a1", "b1")
    bad["routes"][1]["cluster"] = "nope"
    bad["routes"][0]["timeout"] = "-1s"
    code, answer = fleet.service.call("PUT", f"/v1/services/{SERVICE}/config", bad)
    assert code == 422
    paths = [error["path"] for error in answer["errors"]]
    assert "routes[1].cluster" in paths
    assert "routes[0].timeout" in paths
    _, after = fleet.service.call("GET", f"/v1/services/{SERVICE}/versions")
    assert after == before
    for gw in fleet.gateways:
        assert await status(session, f"{gw.url}/b1/x") == 200


async def test_rollback_stores_the_old_content_as_a_new_version(fleet: Fleet, session: aiohttp.ClientSession) -> None:
    _, before = fleet.service.call("GET", f"/v1/services/{SERVICE}/versions")
    latest = before["versions"][-1]["version"]
    code, answer = fleet.service.call("POST", f"/v1/services/{SERVICE}/rollback", {"version": 1})
    assert code == 201
    assert answer["version"] == latest + 1
    await all_serve(session, fleet, "/b1/x", 404, within=2.0)  # version 1 had only a1
    _, history = fleet.service.call("GET", f"/v1/services/{SERVICE}/versions")
    assert [v["version"] for v in history["versions"]] == list(range(1, latest + 2))
    assert history["versions"][-1]["rollback_of"] == 1


async def test_gateways_keep_serving_without_the_service_and_restart_from_cache(
    fleet: Fleet, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    fleet.push("a1", "b2")
    await all_serve(session, fleet, "/b2/x", 200, within=2.0)
    fleet.service.stop()
    try:
        for gw in fleet.gateways:
            assert await status(session, f"{gw.url}/b2/x") == 200
        # A gateway started while the service is down serves the last good config from its cache directory.
        restarted_config = bootstrap(fleet.service, fleet.tmp, "gw1")
        with gateway(tmp_path, restarted_config) as again:
            assert await status(session, f"{again.url}/b2/x") == 200
            async with session.get(f"{again.admin_url}/readyz") as response:
                assert (await response.json(content_type=None))["source"] == "cache"
    finally:
        fleet.service.start()


async def test_a_new_bundle_changes_decisions_on_the_next_request_after_the_pull(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    policy = fleet.tmp / "policy"
    policy.mkdir()
    (policy / ".manifest").write_text(json.dumps({"revision": "p1", "roots": ["meshgate"]}))

    def publish(allowed_route: str, revision: str) -> None:
        (policy / ".manifest").write_text(json.dumps({"revision": revision, "roots": ["meshgate"]}))
        (policy / "authz.rego").write_text(
            f'package meshgate.authz\n\nimport rego.v1\n\nallow if input.meshgate.route == "{allowed_route}"\n'
        )
        build_tarball(policy, fleet.tmp / "bundle.tar.gz")
        code, answer = fleet.service.call("PUT", "/v1/bundles/authz", raw=(fleet.tmp / "bundle.tar.gz").read_bytes())
        assert code in (200, 201), answer

    publish("a1", "p1")
    fleet.push("a1", "b2", extra={"authz": {"bundle": "authz"}})
    # A bound, not a speed claim (bundle_refresh is 200ms; the push-to-applied timing is bench/'s job): generous
    # enough for a loaded 2-core CI machine.
    await all_serve(session, fleet, "/b2/x", 403, within=10.0)
    for gw in fleet.gateways:
        assert await status(session, f"{gw.url}/a1/x") == 200
    publish("b2", "p2")
    await all_serve(session, fleet, "/b2/x", 200, within=10.0)
    for gw in fleet.gateways:
        assert await status(session, f"{gw.url}/a1/x") == 403


async def test_registry_discovery_follows_instances_under_load(
    fleet: Fleet, session: aiohttp.ClientSession, upstream_a: int, upstream_b: int
) -> None:
    register = "/v1/services/backend/instances"
    for instance, port in (("a", upstream_a),):
        assert (
            fleet.service.call("PUT", f"{register}/{instance}", {"address": f"127.0.0.1:{port}", "ttl": "2s"})[0] == 200
        )
    config = pushed(*fleet.upstreams, "a1")
    config["routes"].append(
        {"name": "reg", "match": {"path_prefix": "/reg/"}, "cluster": "backend", "rewrite": {"prefix": "/anything/"}}
    )
    config["clusters"].append({"name": "backend", "discovery": {"registry": "backend"}})
    fleet.service.push(SERVICE, config)
    await all_serve(session, fleet, "/reg/x", 200, within=10.0)

    failures: list[int] = []
    seen: set[str] = set()
    stop = asyncio.Event()

    async def load(gw: Gateway) -> None:
        while not stop.is_set():
            async with session.get(f"{gw.url}/reg/x") as response:
                body = await response.read()
                if response.status != 200:
                    failures.append(response.status)
                else:
                    seen.add(json.loads(body)["instance"])

    workers = [asyncio.create_task(load(gw)) for gw in fleet.gateways for _ in range(4)]
    try:
        # b joins (and keeps heartbeating); a stops heartbeating and expires after its 2 s TTL.
        for _ in range(8):
            fleet.service.call("PUT", f"{register}/b", {"address": f"127.0.0.1:{upstream_b}", "ttl": "2s"})
            await asyncio.sleep(0.5)
        _, listing = fleet.service.call("GET", f"{register}")
        assert [i["id"] for i in listing["instances"]] == ["b"]
        await asyncio.sleep(0.5)  # the gateways' watches wake on the expiry; then only b may answer
        seen.clear()
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert failures == []
    assert seen == {"b"}
