"""push_policies against the OPA stand-in: a bundle directory goes in through the Policy and Data APIs, decisions
come out through RemoteEngine; refusals name the file and carry OPA's message."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from policy.engine import UNDEFINED
from policy.engine_remote import RemoteEngine
from policy.opa_push import PushError, bundle_files, push_policies
from tests.opa_server import opa_server
from tests.procs import free_port

AUTHZ = """package meshgate.authz

import data.meshgate.teams

default allow := false

allow if input.user in data.admins

allow if input.user in teams.red
"""

AUTHZ_TEST = """package meshgate.authz_test

test_nothing if true
"""


def write_bundle(root: Path) -> Path:
    (root / "meshgate" / "teams").mkdir(parents=True)
    (root / "meshgate" / "authz.rego").write_text(AUTHZ)
    (root / "meshgate" / "authz_test.rego").write_text(AUTHZ_TEST)  # tests are not pushed
    (root / "meshgate" / "teams" / "data.json").write_text('{"red": ["carol"]}')
    (root / "data.json").write_text('{"admins": ["alice"], "limits": {"rps": 5}}')  # root keys, one is a list
    (root / ".git").mkdir()
    (root / ".git" / "stale.rego").write_text("not rego at all")  # hidden directories are skipped
    return root


@pytest.fixture
def opa_url() -> Iterator[str]:
    with opa_server() as url:
        yield url


async def get(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.json()


def test_bundle_files_skips_tests_and_hidden_dirs(tmp_path: Path) -> None:
    policies, data = bundle_files(write_bundle(tmp_path))
    assert [p.relative_to(tmp_path).as_posix() for p in policies] == ["meshgate/authz.rego"]
    assert [p.relative_to(tmp_path).as_posix() for p in data] == ["data.json", "meshgate/teams/data.json"]


async def test_push_then_decide(tmp_path: Path, opa_url: str) -> None:
    lines = await push_policies(opa_url, write_bundle(tmp_path), token="secret")
    assert lines == [
        "pushed policy meshgate/authz.rego",
        "pushed data data.json -> data.admins",
        "pushed data data.json -> data.limits",
        "pushed data meshgate/teams/data.json -> data.meshgate.teams",
    ]
    policies = await get(f"{opa_url}/v1/policies")
    assert [p["id"] for p in policies["result"]] == ["meshgate/authz.rego"]
    assert (await get(f"{opa_url}/v1/data/limits/rps"))["result"] == 5

    engine = RemoteEngine(opa_url, "meshgate/authz/allow", 2.0)
    try:
        assert await engine.evaluate({"user": "alice"}) is True  # root data.json
        assert await engine.evaluate({"user": "carol"}) is True  # nested data.json
        assert await engine.evaluate({"user": "mallory"}) is False
    finally:
        await engine.close()
    engine = RemoteEngine(opa_url, "meshgate/authz/nothing", 2.0)
    try:
        assert await engine.evaluate({"user": "alice"}) is UNDEFINED
    finally:
        await engine.close()


async def test_push_is_repeatable(tmp_path: Path, opa_url: str) -> None:
    bundle = write_bundle(tmp_path)
    first = await push_policies(opa_url, bundle)
    (bundle / "data.json").write_text('{"admins": ["bob"], "limits": {"rps": 5}}')
    assert await push_policies(opa_url, bundle) == first
    engine = RemoteEngine(opa_url, "meshgate/authz/allow", 2.0)
    try:
        assert await engine.evaluate({"user": "bob"}) is True
        assert await engine.evaluate({"user": "alice"}) is False  # the document was replaced, not merged
    finally:
        await engine.close()


async def test_syntax_error_names_file_and_opas_message(tmp_path: Path, opa_url: str) -> None:
    bundle = write_bundle(tmp_path)
    (bundle / "meshgate" / "broken.rego").write_text("package meshgate.broken\n\nallow if {{\n")
    with pytest.raises(PushError) as caught:
        await push_policies(opa_url, bundle)
    message = str(caught.value)
    assert message.startswith("meshgate/broken.rego: OPA refused it: error(s) occurred while compiling module(s); ")
    assert "meshgate/broken.rego:4: rego_parse_error: unexpected eof token" in message
    # Files before the broken one (path order) were pushed; OPA kept nothing of the broken one.
    ids = [p["id"] for p in (await get(f"{opa_url}/v1/policies"))["result"]]
    assert ids == ["meshgate/authz.rego"]


async def test_compile_error_names_file(tmp_path: Path, opa_url: str) -> None:
    (tmp_path / "typed.rego").write_text("package typed\n\nallow if no_such_function(input)\n")
    with pytest.raises(PushError, match=r"^typed\.rego: OPA refused it: .*typed\.rego:3: rego_type_error: undefined"):
        await push_policies(opa_url, tmp_path)


async def test_invalid_data_json_pushes_nothing(tmp_path: Path, opa_url: str) -> None:
    bundle = write_bundle(tmp_path)
    (bundle / "meshgate" / "teams" / "data.json").write_text('{"red": [')
    with pytest.raises(PushError, match=r"^meshgate/teams/data\.json: invalid JSON: "):
        await push_policies(opa_url, bundle)
    assert (await get(f"{opa_url}/v1/policies"))["result"] == []


async def test_opa_down(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(PushError, match=rf"^cannot reach OPA at {url}: "):
        await push_policies(url, write_bundle(tmp_path), timeout=2.0)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        pytest.param(lambda d: None, r"no \*\.rego or data\.json files", id="empty"),
        pytest.param(lambda d: (d / "data.json").write_text("[1]"), "must hold a JSON object", id="data-not-object"),
    ],
)
async def test_bad_bundles(tmp_path: Path, setup: Any, message: str) -> None:
    setup(tmp_path)
    with pytest.raises(PushError, match=message):
        await push_policies("http://127.0.0.1:1", tmp_path)


async def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(PushError, match="not a directory"):
        await push_policies("http://127.0.0.1:1", tmp_path / "nope")
