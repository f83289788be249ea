"""RemoteEngine against the OPA stand-in (the real OPA engine behind OPA's REST protocol) on loopback.

Decisions come from a bundle directory loaded at start-up. Failure paths use real conditions where OPA has them
(nothing listening, a rule with two values -> 500, a restart) and the stand-in's knobs where it does not (a slow
OPA, a proxy answering garbage).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from policy.engine import UNDEFINED, PolicyError
from policy.engine_remote import RemoteEngine
from tests.opa_server import opa_server, set_answer
from tests.procs import free_port

TIMEOUT = 0.25  # seconds; enough for a loopback decision on a loaded CI machine

AUTHZ = """package meshgate.authz

default allow := false

allow if input.meshgate.principal.sub in data.roles.admins

decision := {"allowed": true, "headers": {"x-user": input.meshgate.principal.sub}} if allow

decision := {"allowed": false, "http_status": 401, "reason": "no token"} if input.meshgate.principal == null

conflict := true if input.a
conflict := false if input.b
"""


def write_bundle(root: Path) -> Path:
    (root / "meshgate").mkdir(parents=True)
    (root / "meshgate" / "authz.rego").write_text(AUTHZ)
    (root / "data.json").write_text('{"roles": {"admins": ["alice"]}}')
    (root / ".manifest").write_text('{"revision": "rev-7"}')
    return root


def principal(sub: str | None) -> dict[str, Any]:
    return {"meshgate": {"principal": None if sub is None else {"sub": sub}}}


@pytest.fixture(scope="module")
def opa_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with opa_server(write_bundle(tmp_path_factory.mktemp("bundle"))) as url:
        yield url


@pytest.fixture(scope="module")
def knob_url() -> Iterator[str]:
    """A stand-in whose answers the tests override; each test restores real answers."""
    with opa_server() as url:
        yield url


@pytest.mark.parametrize(
    ("decision", "input", "expected"),
    [
        pytest.param("meshgate/authz/allow", principal("alice"), True, id="allow"),
        pytest.param("meshgate/authz/allow", principal("bob"), False, id="deny-is-false-not-undefined"),
        pytest.param(
            "meshgate/authz/decision",
            principal("alice"),
            {"allowed": True, "headers": {"x-user": "alice"}},
            id="object",
        ),
        pytest.param(
            "meshgate/authz/decision",
            principal(None),
            {"allowed": False, "http_status": 401, "reason": "no token"},
            id="object-deny",
        ),
        pytest.param("meshgate/authz/decision", principal("bob"), UNDEFINED, id="undefined-rule-value"),
        pytest.param("meshgate/authz/nonexistent", principal("alice"), UNDEFINED, id="undefined-rule"),
        pytest.param("/roles/admins/", {}, ["alice"], id="data-document-slashes-trimmed"),
    ],
)
async def test_decisions(opa_url: str, decision: str, input: dict[str, Any], expected: object) -> None:
    engine = RemoteEngine(opa_url, decision, TIMEOUT)
    try:
        assert await engine.evaluate(input) == expected
    finally:
        await engine.close()


async def test_name_and_revision_from_provenance(opa_url: str) -> None:
    engine = RemoteEngine(opa_url + "/", "meshgate/authz/allow", TIMEOUT)
    try:
        assert engine.name == "opa"
        assert engine.revision == ""  # nothing asked yet
        await engine.evaluate(principal("alice"))
        assert engine.revision == "rev-7"
    finally:
        await engine.close()


async def test_no_bundle_means_no_revision(knob_url: str) -> None:
    engine = RemoteEngine(knob_url, "anything", TIMEOUT)
    try:
        assert await engine.evaluate({}) is UNDEFINED
        assert engine.revision == ""
    finally:
        await engine.close()


async def test_concurrent_decisions_share_the_pool(opa_url: str) -> None:
    engine = RemoteEngine(opa_url, "meshgate/authz/allow", 5.0)
    try:
        users = ["alice", "bob"] * 50
        results = await asyncio.gather(*(engine.evaluate(principal(u)) for u in users))
        assert results == [u == "alice" for u in users]
    finally:
        await engine.close()


async def test_opa_down_is_connection_refused() -> None:
    port = free_port()  # nothing listens there
    engine = RemoteEngine(f"http://127.0.0.1:{port}", "meshgate/authz/allow", TIMEOUT)
    try:
        with pytest.raises(PolicyError, match=rf"^opa: connection refused \(127\.0\.0\.1:{port}\)$"):
            await engine.evaluate({})
    finally:
        await engine.close()


async def test_slow_opa_times_out_quickly(tmp_path: Path) -> None:
    with opa_server(write_bundle(tmp_path), delay=30.0) as url:
        engine = RemoteEngine(url, "meshgate/authz/allow", TIMEOUT)
        try:
            started = time.monotonic()
            with pytest.raises(PolicyError, match=r"^opa: timeout after 250ms$"):
                await engine.evaluate(principal("alice"))
            elapsed = time.monotonic() - started
        finally:
            await engine.close()
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT * 3


async def test_evaluation_error_is_http_500_with_opas_message(opa_url: str) -> None:
    engine = RemoteEngine(opa_url, "meshgate/authz/conflict", TIMEOUT)
    try:
        with pytest.raises(PolicyError) as caught:
            await engine.evaluate({"a": True, "b": True})
    finally:
        await engine.close()
    assert str(caught.value) == (
        "opa: HTTP 500: error(s) occurred while evaluating query: "
        "eval_conflict_error: complete rules must not produce multiple outputs"
    )


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        pytest.param(200, "<html>not json</html>", "opa: answer is not JSON", id="not-json"),
        pytest.param(200, "[true]", "opa: answer is not a JSON object", id="not-object"),
        pytest.param(503, "", "opa: HTTP 503: (empty body)", id="empty-error"),
        pytest.param(502, "<h1>Bad Gateway</h1>", "opa: HTTP 502: <h1>Bad Gateway</h1>", id="proxy-error"),
        pytest.param(
            500,
            '{"code": "internal_error", "message": "storage unavailable"}',
            "opa: HTTP 500: storage unavailable",
            id="opa-error-without-details",
        ),
    ],
)
async def test_bad_answers_are_policy_errors(knob_url: str, status: int, body: str, message: str) -> None:
    engine = RemoteEngine(knob_url, "meshgate/authz/allow", TIMEOUT)
    set_answer(knob_url, status, body)
    try:
        with pytest.raises(PolicyError) as caught:
            await engine.evaluate({})
        assert str(caught.value) == message
    finally:
        set_answer(knob_url, None)
        await engine.close()


async def test_survives_an_opa_restart_between_decisions(tmp_path: Path) -> None:
    """The pooled keep-alive connection dies with the old process; the next decision must still be answered."""
    bundle, port = write_bundle(tmp_path), free_port()
    engine = RemoteEngine(f"http://127.0.0.1:{port}", "meshgate/authz/allow", 2.0)
    try:
        with opa_server(bundle, port=port):
            assert await engine.evaluate(principal("alice")) is True
        with opa_server(bundle, port=port):
            assert await engine.evaluate(principal("alice")) is True
    finally:
        await engine.close()


async def test_injected_session_is_used_and_left_open(opa_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        engine = RemoteEngine(opa_url, "meshgate/authz/allow", TIMEOUT, session=session)
        assert await engine.evaluate(principal("alice")) is True
        await engine.close()
        assert not session.closed
