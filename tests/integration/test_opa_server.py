"""Sanity of the OPA stand-in (``tests/opa_server.py``): it must answer as OPA does, or the RemoteEngine and push
tests prove nothing. Each expectation below is OPA's documented REST behaviour."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from tests.opa_server import opa_server

POLICY = """package demo

default allow := false

allow if input.user == "alice"

conflict := true if input.a
conflict := false if input.b
"""


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with opa_server(decision_ids=True) as base:
        yield base


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with http.request(method, url, **kwargs) as response:
        body = await response.json(content_type=None) if response.status != 204 else None
        return response.status, body


async def test_policy_put_get_list_delete(url: str, http: aiohttp.ClientSession) -> None:
    assert await call(http, "PUT", f"{url}/v1/policies/sanity/p.rego", data="package sanity\nx := 1\n") == (200, {})
    status, body = await call(http, "GET", f"{url}/v1/policies")
    assert status == 200
    assert {"id": "sanity/p.rego", "raw": "package sanity\nx := 1\n"} in body["result"]
    assert (await call(http, "GET", f"{url}/v1/data/sanity/x"))[1]["result"] == 1
    assert await call(http, "DELETE", f"{url}/v1/policies/sanity/p.rego") == (200, {})
    status, body = await call(http, "DELETE", f"{url}/v1/policies/sanity/p.rego")
    assert (status, body["code"]) == (404, "resource_not_found")


async def test_decisions_defined_and_undefined(url: str, http: aiohttp.ClientSession) -> None:
    assert (await call(http, "PUT", f"{url}/v1/policies/demo.rego", data=POLICY))[0] == 200
    status, body = await call(http, "POST", f"{url}/v1/data/demo/allow", json={"input": {"user": "alice"}})
    assert status == 200
    assert body["result"] is True
    assert isinstance(body["decision_id"], str)  # --decision-ids
    _, body = await call(http, "POST", f"{url}/v1/data/demo/allow", json={"input": {"user": "bob"}})
    assert body["result"] is False  # false is a value, not undefined
    status, body = await call(http, "POST", f"{url}/v1/data/demo/missing", json={"input": {}})
    assert status == 200
    assert "result" not in body  # undefined: 200 with no result key


async def test_undefined_is_an_empty_object_without_decision_ids(http: aiohttp.ClientSession) -> None:
    with opa_server() as base:
        assert await call(http, "POST", f"{base}/v1/data/nothing/here", json={"input": {}}) == (200, {})


async def test_policy_put_error_has_opas_shape(url: str, http: aiohttp.ClientSession) -> None:
    status, body = await call(http, "PUT", f"{url}/v1/policies/broken.rego", data="package broken\nallow if {{\n")
    assert status == 400
    assert body["code"] == "invalid_parameter"
    assert body["message"] == "error(s) occurred while compiling module(s)"
    [error] = body["errors"]
    assert error["code"] == "rego_parse_error"
    assert error["location"]["file"] == "broken.rego"
    assert isinstance(error["location"]["row"], int)

    status, body = await call(http, "PUT", f"{url}/v1/policies/typed.rego", data="package t\nallow if nope(1)\n")
    assert status == 400
    assert body["errors"][0]["code"] == "rego_type_error"
    assert "nope" in body["errors"][0]["message"]
    # A refused module is not kept: the list and the data document are as before.
    _, listed = await call(http, "GET", f"{url}/v1/policies")
    assert {p["id"] for p in listed["result"]}.isdisjoint({"broken.rego", "typed.rego"})


async def test_evaluation_error_is_a_500(url: str, http: aiohttp.ClientSession) -> None:
    assert (await call(http, "PUT", f"{url}/v1/policies/demo.rego", data=POLICY))[0] == 200
    status, body = await call(http, "POST", f"{url}/v1/data/demo/conflict", json={"input": {"a": 1, "b": 1}})
    assert status == 500
    assert body["code"] == "internal_error"
    assert body["errors"][0]["code"] == "eval_conflict_error"


async def test_data_put_and_get(url: str, http: aiohttp.ClientSession) -> None:
    assert await call(http, "PUT", f"{url}/v1/data/acl/teams", json={"red": ["alice"]}) == (204, None)
    _, body = await call(http, "GET", f"{url}/v1/data/acl")
    assert body["result"] == {"teams": {"red": ["alice"]}}
    _, body = await call(http, "GET", f"{url}/v1/data/acl/teams/red/0")  # integer segments index arrays
    assert body["result"] == "alice"


async def test_health(url: str, http: aiohttp.ClientSession) -> None:
    assert await call(http, "GET", f"{url}/health") == (200, {})
