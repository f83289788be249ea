"""The config service API on loopback: the aiohttp app over a real SQLite store in tmp, through real sockets."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from gateway.configservice.api import build_app
from gateway.configservice.auth import Token, TokenSet
from gateway.configservice.http import ApiState
from gateway.configservice.store_sqlite import SqliteStore
from policy.bundle import build_tarball
from telemetry.metrics import ConfigServiceMetrics
from tests.procs import metric_sum

ADMIN = "admin-token-0123456789abcdef"
GATEWAY = "gateway-token-0123456789abcdef"
ORDERS_ONLY = "orders-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
GW_AUTH = {"Authorization": f"Bearer {GATEWAY}"}

POLICY = """package meshgate.authz

import rego.v1

default allow := false

allow if input.attributes.request.http.method == "GET"
"""


def config(route: str = "r1", **extra: Any) -> dict[str, Any]:
    return {
        "routes": [{"name": route, "match": {"path_prefix": "/"}, "cluster": "c"}],
        "clusters": [{"name": "c", "endpoints": ["127.0.0.1:9001"]}],
        **extra,
    }


def tarball(tmp_path: Path, policy: str = POLICY, revision: str = "r1") -> bytes:
    directory = tmp_path / f"bundle-{revision}"
    directory.mkdir()
    (directory / ".manifest").write_text(json.dumps({"revision": revision}))
    (directory / "authz.rego").write_text(policy)
    out = tmp_path / f"bundle-{revision}.tar.gz"
    build_tarball(directory, out)
    return out.read_bytes()


@dataclass
class Service:
    client: TestClient[aiohttp.web.Request, aiohttp.web.Application]
    state: ApiState
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    store = await SqliteStore.open(tmp_path / "data")
    tokens = TokenSet(
        [
            Token("ops", "admin", None, ADMIN),
            Token("gw", "gateway", None, GATEWAY),
            Token("orders-gw", "gateway", "orders", ORDERS_ONLY),
        ]
    )
    state = ApiState(store, tokens, ConfigServiceMetrics())
    server = TestServer(build_app(state), host="127.0.0.1", handler_cancellation=True)
    client = TestClient(server)
    await client.start_server()
    assert server.port is not None
    try:
        yield Service(client, state, server.port)
    finally:
        await client.close()
        await store.close()


async def put_config(service: Service, name: str, document: object, **headers: str) -> aiohttp.ClientResponse:
    text = document if isinstance(document, str | bytes) else json.dumps(document)
    body = text.encode() if isinstance(text, str) else text
    # aiohttp warns about large raw bodies (it would write them in one go): a stream for the 413 test.
    data = io.BytesIO(body) if len(body) > 1024 * 1024 else body
    return await service.client.put(f"/v1/services/{name}/config", data=data, headers={**AUTH, **headers})


# --------------------------------------------------------------------------------------------- configs


async def test_push_read_unchanged_and_history(service: Service) -> None:
    response = await put_config(service, "orders", config())
    assert response.status == 201
    assert await response.json() == {"version": 1}

    response = await service.client.get("/v1/services/orders/config", headers=GW_AUTH)
    assert response.status == 200
    body = await response.json()
    assert body["version"] == 1
    assert body["config"] == config()
    assert body["author"] == "ops"
    assert len(body["hash"]) == 64
    assert response.headers["ETag"] == f'"1-{body["hash"][:12]}"'

    # The same content again (as YAML this time): no new version.
    response = await put_config(service, "orders", yaml.safe_dump(config()))
    assert response.status == 200
    assert await response.json() == {"version": 1, "unchanged": True}

    assert (await put_config(service, "orders", config("r2"))).status == 201
    response = await service.client.get("/v1/services/orders/versions", headers=GW_AUTH)
    versions = (await response.json())["versions"]
    assert [v["version"] for v in versions] == [1, 2]
    assert versions[0]["author"] == "ops"
    assert versions[1]["rollback_of"] is None
    assert versions[0]["created_at"].endswith("Z")


async def test_invalid_config_lists_every_problem_and_stores_nothing(service: Service) -> None:
    document = {
        "listen": "127.0.0.1:8080",
        "routes": [{"name": "r", "match": {"path_prefix": "/"}, "cluster": "missing"}],
        "clusters": [{"name": "c", "endpoints": ["not-an-address"]}],
        "bogus": 1,
    }
    response = await put_config(service, "orders", document)
    assert response.status == 422
    body = await response.json()
    assert body["error"] == "invalid_config"
    paths = [error["path"] for error in body["errors"]]
    assert "listen" in paths
    assert {"path": "listen", "message": "set by the gateway's bootstrap file, not by the config service"} in body[
        "errors"
    ]
    assert "bogus" in paths
    assert any(path.startswith("routes[0]") for path in paths)
    assert any(path.startswith("clusters[0]") for path in paths)
    response = await service.client.get("/v1/services/orders/config", headers=AUTH)
    assert response.status == 404
    assert (await response.json())["error"] == "not_found"
    assert metric_sum(await scrape(service), "meshgate_configservice_pushes_total", result="rejected") == 1


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        pytest.param("routes: [", 400, "bad_request", id="bad-yaml"),
        pytest.param("a: 1\na: 2\n", 400, "bad_request", id="duplicate-key"),
        pytest.param(b"\xff\xfe", 400, "bad_request", id="not-utf8"),
        pytest.param("", 422, "invalid_config", id="empty"),
        pytest.param("[1, 2]", 422, "invalid_config", id="not-a-mapping"),
        pytest.param("x" * (4 * 1024 * 1024 + 1), 413, "payload_too_large", id="too-large"),
    ],
)
async def test_bad_bodies(service: Service, body: str | bytes, status: int, code: str) -> None:
    response = await put_config(service, "orders", body)
    assert response.status == status
    answer = await response.json()
    assert answer["error"] == code
    assert "Traceback" not in json.dumps(answer)


async def test_unknown_paths_methods_and_names_are_json(service: Service) -> None:
    response = await service.client.get("/v1/nothing", headers=AUTH)
    assert response.status == 404
    assert (await response.json())["error"] == "not_found"
    response = await service.client.delete("/v1/services/orders/config", headers=AUTH)
    assert response.status == 405
    assert (await response.json())["error"] == "method_not_allowed"
    response = await service.client.get("/v1/services/Orders!/config", headers=AUTH)
    assert response.status == 400
    assert "invalid service" in (await response.json())["message"]
    response = await service.client.get("/v1/services/orders/config?wait=soon", headers=AUTH)
    assert response.status == 400


# --------------------------------------------------------------------------------------------- auth


async def test_auth(service: Service) -> None:
    response = await service.client.get("/v1/services/orders/config")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await response.json())["error"] == "unauthenticated"
    response = await service.client.get("/v1/services/orders/config", headers={"Authorization": "Bearer nope"})
    assert response.status == 401
    response = await service.client.get("/v1/services/orders/config", headers={"Authorization": f"Basic {ADMIN}"})
    assert response.status == 401

    response = await put_config(service, "orders", config(), Authorization=f"Bearer {GATEWAY}")
    assert response.status == 403
    assert (await response.json())["error"] == "forbidden"

    restricted = {"Authorization": f"Bearer {ORDERS_ONLY}"}
    assert (await service.client.get("/v1/services/payments/config", headers=restricted)).status == 403
    assert (await service.client.get("/v1/services/orders/config", headers=restricted)).status == 404
    response = await service.client.put(
        "/v1/services/payments/instances/i1", json={"address": "127.0.0.1:1"}, headers=restricted
    )
    assert response.status == 403
    response = await service.client.put(
        "/v1/services/orders/instances/i1", json={"address": "127.0.0.1:1"}, headers=restricted
    )
    assert response.status == 200

    # Open: health and metrics.
    assert (await service.client.get("/healthz")).status == 200
    assert (await service.client.get("/metrics")).status == 200


# --------------------------------------------------------------------------------------------- watching


async def test_long_poll_wakes_on_push_and_304s_at_the_end(service: Service) -> None:
    created = await put_config(service, "orders", config())
    assert created.status == 201
    tag = created.headers["ETag"]
    assert tag.startswith('"1-')
    headers = {**GW_AUTH, "If-None-Match": tag}

    response = await service.client.get("/v1/services/orders/config", headers=headers)
    assert response.status == 304  # no wait: at once
    assert response.headers["ETag"] == tag

    started = time.monotonic()
    response = await service.client.get("/v1/services/orders/config?wait=200ms", headers=headers)
    assert response.status == 304
    assert 0.15 < time.monotonic() - started < 2

    poll = asyncio.ensure_future(service.client.get("/v1/services/orders/config?wait=10s", headers=headers))
    await asyncio.sleep(0.2)
    assert not poll.done()
    pushed = time.monotonic()
    assert (await put_config(service, "orders", config("r2"))).status == 201
    response = await poll
    assert time.monotonic() - pushed < 0.5
    assert response.status == 200
    assert (await response.json())["config"] == config("r2")

    # An ETag the service does not have (a gateway ahead of a restored store) answers at once.
    stale = {**GW_AUTH, "If-None-Match": '"7"'}
    response = await service.client.get("/v1/services/orders/config?wait=10s", headers=stale)
    assert response.status == 200


async def test_a_restored_store_numbering_back_to_a_held_version_answers_at_once(
    service: Service, tmp_path: Path
) -> None:
    assert (await put_config(service, "orders", config("r1"))).status == 201
    held = (await service.client.get("/v1/services/orders/config", headers=GW_AUTH)).headers["ETag"]
    # The store is wiped (or restored from an old backup) and numbers from 1 again, with other content.
    original = service.state.store
    service.state.store = await SqliteStore.open(tmp_path / "restored")
    try:
        assert (await put_config(service, "orders", config("r9"))).status == 201
        started = time.monotonic()
        headers = {**GW_AUTH, "If-None-Match": held}
        response = await service.client.get("/v1/services/orders/config?wait=10s", headers=headers)
        assert time.monotonic() - started < 2  # not parked: the gateway's version 1 is not this version 1
        assert response.status == 200
        assert (await response.json())["config"] == config("r9")
        assert response.headers["ETag"] not in (held, '"1"')
        assert response.headers["ETag"].startswith('"1-')
        # A gateway sending the plain "N" (before the hashed ETag) is still understood: 304, and it long-polls.
        for tag in ('"1"', response.headers["ETag"]):
            started = time.monotonic()
            headers = {**GW_AUTH, "If-None-Match": tag}
            answer = await service.client.get("/v1/services/orders/config?wait=200ms", headers=headers)
            assert answer.status == 304
            assert 0.15 < time.monotonic() - started < 2
    finally:
        await service.state.store.close()
        service.state.store = original


async def test_long_poll_for_a_first_version(service: Service) -> None:
    headers = {**GW_AUTH, "If-None-Match": '"0"'}
    poll = asyncio.ensure_future(service.client.get("/v1/services/fresh/config?wait=10s", headers=headers))
    await asyncio.sleep(0.1)
    assert (await put_config(service, "fresh", config())).status == 201
    response = await poll
    assert response.status == 200
    assert response.headers["ETag"].startswith('"1-')
    response = await service.client.get("/v1/services/none/config?wait=100ms", headers=headers)
    assert response.status == 404


async def test_two_thousand_watchers_wake_within_a_second(service: Service) -> None:
    """2,000 long-polls parked on one service (each its own connection); one push answers all of them."""
    assert (await put_config(service, "orders", config())).status == 201
    count = 2000
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        headers = {**GW_AUTH, "If-None-Match": '"1"'}
        url = f"{service.url}/v1/services/orders/config?wait=30s"
        answered: list[float] = []

        async def watch() -> int:
            async with session.get(url, headers=headers) as response:
                await response.read()
                answered.append(time.monotonic())
                return response.status

        watchers = [asyncio.ensure_future(watch()) for _ in range(count)]
        deadline = time.monotonic() + 20
        while parked(service) < count:
            assert time.monotonic() < deadline, "watchers did not all park"
            assert not any(w.done() for w in watchers), "a watcher answered before the push"
            await asyncio.sleep(0.05)
        pushed = time.monotonic()
        async with session.put(
            f"{service.url}/v1/services/orders/config", data=json.dumps(config("r2")), headers=AUTH
        ) as response:
            assert response.status == 201
        statuses = await asyncio.gather(*watchers)
    assert statuses == [200] * count
    latency = max(answered) - pushed
    print(f"\n2000 watchers: last answered {latency * 1000:.0f} ms after the PUT was sent")
    assert latency < 1.0
    assert parked(service) == 0


async def test_stopping_answers_parked_polls(service: Service) -> None:
    assert (await put_config(service, "orders", config())).status == 201
    headers = {**GW_AUTH, "If-None-Match": '"1"'}
    poll = asyncio.ensure_future(service.client.get("/v1/services/orders/config?wait=30s", headers=headers))
    await asyncio.sleep(0.1)
    service.state.stop_polls()
    response = await asyncio.wait_for(poll, 2)
    assert response.status == 304


# --------------------------------------------------------------------------------------------- rollback


async def test_rollback(service: Service) -> None:
    await put_config(service, "orders", config("r1"))
    await put_config(service, "orders", config("r2"))
    response = await service.client.post("/v1/services/orders/rollback", json={"version": 1}, headers=AUTH)
    assert response.status == 201
    assert await response.json() == {"version": 3, "rollback_of": 1}
    body = await (await service.client.get("/v1/services/orders/config", headers=AUTH)).json()
    assert body["config"] == config("r1")
    assert body["rollback_of"] == 1
    # Rolling back to what is already served stores nothing.
    response = await service.client.post("/v1/services/orders/rollback", json={"version": 1}, headers=AUTH)
    assert response.status == 200
    assert await response.json() == {"version": 3, "unchanged": True}
    response = await service.client.post("/v1/services/orders/rollback", json={"version": 9}, headers=AUTH)
    assert response.status == 404
    response = await service.client.post("/v1/services/orders/rollback", json={"version": "1"}, headers=AUTH)
    assert response.status == 400
    response = await service.client.post("/v1/services/orders/rollback", data="{", headers=AUTH)
    assert response.status == 400
    response = await service.client.post("/v1/services/orders/rollback", json={"version": 1}, headers=GW_AUTH)
    assert response.status == 403


# --------------------------------------------------------------------------------------------- bundles


async def test_bundles_and_configs_naming_them(service: Service, tmp_path: Path) -> None:
    data = tarball(tmp_path)
    # A config naming a bundle that is not stored yet.
    response = await put_config(service, "orders", config(authz={"bundle": "authz"}))
    assert response.status == 422
    assert (await response.json())["errors"] == [
        {"path": "authz.bundle", "message": "no bundle named 'authz' in the config service (PUT /v1/bundles/authz)"}
    ]

    response = await service.client.put("/v1/bundles/authz", data=data, headers=AUTH)
    assert response.status == 201
    stored = await response.json()
    assert stored["revision"] == "r1"
    etag = response.headers["ETag"]
    assert etag == f'"{stored["etag"]}"'
    assert (await service.client.put("/v1/bundles/authz", data=data, headers=AUTH)).status == 200  # identical

    response = await service.client.get("/v1/bundles/authz", headers=GW_AUTH)
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/gzip"
    assert await response.read() == data
    response = await service.client.get("/v1/bundles/authz", headers={**GW_AUTH, "If-None-Match": etag})
    assert response.status == 304
    assert (await service.client.get("/v1/bundles/other", headers=GW_AUTH)).status == 404
    assert (await service.client.put("/v1/bundles/authz", data=data, headers=GW_AUTH)).status == 403

    assert (await put_config(service, "orders", config(authz={"bundle": "authz"}))).status == 201
    # The decision rule is checked against the stored bundle, as the gateway would load it.
    response = await put_config(service, "orders", config(authz={"bundle": "authz", "decision": "meshgate/authz/nope"}))
    assert response.status == 422
    (error,) = (await response.json())["errors"]
    assert error["path"] == "authz.bundle"
    assert "has no rule nope" in error["message"]
    assert "/tmp" not in error["message"]
    # A path is not a bundle name.
    response = await put_config(service, "orders", config(authz={"bundle": "./policy/rego"}))
    assert response.status == 422
    assert "not a bundle name" in (await response.json())["errors"][0]["message"]
    exposition = await scrape(service)
    assert 'meshgate_configservice_bundle_info{name="authz",revision="r1"} 1.0' in exposition


async def test_bundle_calling_an_unknown_builtin_is_refused(service: Service, tmp_path: Path) -> None:
    policy = POLICY + "\nweird if foo.bar(input.x)\n"
    response = await service.client.put("/v1/bundles/authz", data=tarball(tmp_path, policy), headers=AUTH)
    assert response.status == 422
    assert (await response.json())["errors"] == [
        {
            "path": "authz.rego",
            "message": "line 9: built-in foo.bar is not available in the embedded engine (use authz.engine: opa if "
            "OPA has it)",
        }
    ]
    response = await service.client.put("/v1/bundles/authz", data=b"not a tarball", headers=AUTH)
    assert response.status == 422
    assert (await response.json())["errors"][0]["path"] == "(bundle)"
    assert (await service.client.get("/v1/bundles/authz", headers=AUTH)).status == 404


# --------------------------------------------------------------------------------------------- instances


async def test_instances_join_leave_and_expire_waking_watchers(service: Service) -> None:
    response = await service.client.get("/v1/services/orders/instances", headers=GW_AUTH)
    assert await response.json() == {"version": 0, "instances": []}
    response = await service.client.put(
        "/v1/services/orders/instances/a", json={"address": "127.0.0.1:9001", "ttl": "1s"}, headers=GW_AUTH
    )
    assert response.status == 200
    assert await response.json() == {"id": "a", "address": "127.0.0.1:9001", "expires_in": 1.0}
    await service.client.put(
        "/v1/services/orders/instances/b", json={"address": "127.0.0.1:9002", "ttl": "30s"}, headers=GW_AUTH
    )
    response = await service.client.get("/v1/services/orders/instances", headers=GW_AUTH)
    listing = await response.json()
    assert listing["version"] == 2
    assert [i["id"] for i in listing["instances"]] == ["a", "b"]
    # A heartbeat that changes nothing is not a new list version.
    await service.client.put(
        "/v1/services/orders/instances/b", json={"address": "127.0.0.1:9002", "ttl": "30s"}, headers=GW_AUTH
    )
    response = await service.client.get("/v1/services/orders/instances", headers=GW_AUTH)
    assert response.headers["ETag"] == '"2"'

    # Nobody writes: instance a's expiry alone wakes the watcher.
    started = time.monotonic()
    response = await service.client.get(
        "/v1/services/orders/instances?wait=10s", headers={**GW_AUTH, "If-None-Match": '"2"'}
    )
    assert response.status == 200
    assert time.monotonic() - started < 2.5
    listing = await response.json()
    assert listing["version"] == 3
    assert [i["id"] for i in listing["instances"]] == ["b"]

    assert (await service.client.delete("/v1/services/orders/instances/b", headers=GW_AUTH)).status == 204
    assert (await service.client.delete("/v1/services/orders/instances/b", headers=GW_AUTH)).status == 404
    listing = await (await service.client.get("/v1/services/orders/instances", headers=GW_AUTH)).json()
    assert listing == {"version": 4, "instances": []}


@pytest.mark.parametrize(
    ("body", "path"),
    [
        pytest.param({}, "address", id="no-address"),
        pytest.param({"address": "http://x:1"}, "address", id="url"),
        pytest.param({"address": "127.0.0.1:1", "ttl": "10m"}, "ttl", id="ttl-too-long"),
        pytest.param({"address": "127.0.0.1:1", "ttl": 10}, "ttl", id="ttl-number"),
        pytest.param({"address": "127.0.0.1:1", "port": 1}, "port", id="unknown-key"),
    ],
)
async def test_invalid_instances(service: Service, body: dict[str, Any], path: str) -> None:
    response = await service.client.put("/v1/services/orders/instances/a", json=body, headers=GW_AUTH)
    assert response.status == 422
    assert path in [error["path"] for error in (await response.json())["errors"]]


# --------------------------------------------------------------------------------------------- gateway status


async def test_gateway_reports_and_push_to_applied(service: Service) -> None:
    await put_config(service, "orders", config())
    poll = {**GW_AUTH, "X-Meshgate-Gateway": "gw-1", "X-Meshgate-Applied-Version": "1"}
    await service.client.get("/v1/services/orders/config", headers=poll)
    await put_config(service, "orders", config("r2"))
    # The gateway refuses version 2 and says so (once); the refusal stays listed while it serves 1.
    refused = {**poll, "X-Meshgate-Rejected-Version": "2", "X-Meshgate-Rejected-Error": "x" * 400}
    await service.client.get("/v1/services/orders/config", headers=refused)
    await service.client.get("/v1/services/orders/config", headers=poll)
    (row,) = (await (await service.client.get("/v1/gateways", headers=GW_AUTH)).json())["gateways"]
    assert row["id"] == "gw-1"
    assert row["applied_version"] == 1
    assert row["latest_version"] == 2
    assert row["rejected_version"] == 2
    assert len(row["error"]) == 300
    assert row["last_seen_ago_s"] < 5
    await put_config(service, "orders", config("r3"))
    await service.client.get("/v1/services/orders/config", headers={**poll, "X-Meshgate-Applied-Version": "3"})
    (row,) = (await (await service.client.get("/v1/gateways", headers=GW_AUTH)).json())["gateways"]
    assert (row["applied_version"], row["rejected_version"], row["error"]) == (3, 0, "")
    exposition = await scrape(service)
    assert metric_sum(exposition, "meshgate_configservice_push_to_applied_seconds_count") == 1
    assert metric_sum(exposition, "meshgate_configservice_gateway_applied_version", gateway="gw-1") == 3
    assert metric_sum(exposition, "meshgate_configservice_latest_version", service="orders") == 3
    restricted = {"Authorization": f"Bearer {ORDERS_ONLY}"}
    assert len((await (await service.client.get("/v1/gateways", headers=restricted)).json())["gateways"]) == 1
    assert (await service.client.get("/v1/gateways?service=other", headers=restricted)).status == 403
    bad = {**GW_AUTH, "X-Meshgate-Gateway": "gw-1", "X-Meshgate-Applied-Version": "one"}
    assert (await service.client.get("/v1/services/orders/config", headers=bad)).status == 400
    # The id becomes a metric label and a store key: the gateway's own alphabet (config_service.gateway_id) only.
    for wrong in ("gw 1", "gw/1", "-gw", "g" * 129):
        bad = {**GW_AUTH, "X-Meshgate-Gateway": wrong, "X-Meshgate-Applied-Version": "1"}
        assert (await service.client.get("/v1/services/orders/config", headers=bad)).status == 400, wrong


async def test_metrics_count_requests_by_route_template(service: Service) -> None:
    await put_config(service, "orders", config())
    await service.client.get("/v1/services/orders/config", headers=GW_AUTH)
    await service.client.get("/v1/services/payments/config", headers=GW_AUTH)
    exposition = await scrape(service)
    route = "/v1/services/{service}/config"
    assert metric_sum(exposition, "meshgate_configservice_requests_total", route=route, code="200") == 1
    assert metric_sum(exposition, "meshgate_configservice_requests_total", route=route, code="404") == 1
    assert metric_sum(exposition, "meshgate_configservice_pushes_total", service="orders", result="created") == 1


def parked(service: Service) -> float:
    return service.state.metrics.registry.get_sample_value("meshgate_configservice_watchers") or 0.0


async def scrape(service: Service) -> str:
    return await (await service.client.get("/metrics")).text()


async def test_store_survives_reopen_and_refuses_a_second_process(tmp_path: Path) -> None:
    from gateway.configservice.store_sqlite import StoreBusy

    store = await SqliteStore.open(tmp_path / "d")
    with pytest.raises(StoreBusy, match="in use by another configservice process"):
        await SqliteStore.open(tmp_path / "d")
    info, created = await store.put_config("orders", config(), "h1", "ops")
    assert (info.version, created) == (1, True)
    await store.put_instance("orders", "a", "127.0.0.1:1", 60)
    await store.close()
    store = await SqliteStore.open(tmp_path / "d")
    try:
        latest = await store.latest("orders")
        assert latest is not None
        assert latest.info.version == 1
        assert latest.document == config()
        assert (await store.put_config("orders", config("r2"), "h2", "ops"))[0].version == 2
        assert [i.id for i in (await store.instances("orders")).instances] == ["a"]
    finally:
        await store.close()
