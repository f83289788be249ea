"""JwksKeys against a real aiohttp JWKS server on loopback, and StaticKeys against real key files.

The server's document, status and delay are switched mid-test to play an IdP that rotates keys, goes down and comes
back. The unknown-kid refetch is paced by an injected clock; background refresh/backoff uses small real intervals.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from policy.jwks import JwksKeys, StaticKeys
from policy.jwt import ASYMMETRIC_ALGORITHMS, JwtRule, KeySet, Unauthenticated, verify
from tests.jwt_tokens import KeyPair, jwks

NOW = 1_700_000_000.0
RULE = JwtRule("https://idp.example", frozenset(), ASYMMETRIC_ALGORITHMS)
K1 = KeyPair.ec("k1")
K2 = KeyPair.ec("k2")
RSA = KeyPair.rsa("r1")
CLAIMS = {"iss": "https://idp.example", "sub": "alice", "exp": NOW + 60}


class Idp:
    """A JWKS endpoint whose answer tests control: ``doc`` (JSON value or raw bytes), ``status``, ``delay``."""

    def __init__(self) -> None:
        self.doc: object = jwks(K1)
        self.status = 200
        self.delay = 0.0
        self.chunked = False
        self.hits = 0
        self.headers: list[dict[str, str]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        self.headers.append(dict(request.headers))
        if self.delay:
            await asyncio.sleep(self.delay)
        body = self.doc if isinstance(self.doc, bytes) else json.dumps(self.doc).encode()
        if self.chunked:
            response = web.StreamResponse(status=self.status, headers={"Content-Type": "application/json"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for start in range(0, len(body), 65536):
                await response.write(body[start : start + 65536])
            await response.write_eof()
            return response
        return web.Response(status=self.status, body=body, content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks.json", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/jwks.json"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def idp() -> AsyncIterator[Idp]:
    server = Idp()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def source(idp: Idp, clock: Clock) -> AsyncIterator[JwksKeys]:
    keys = JwksKeys(idp.url, refresh_interval=3600, min_refetch_interval=10, fetch_timeout=2, clock=clock)
    yield keys
    await keys.close()


async def eventually(condition: Any, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_start_loads_keys_and_tokens_verify(idp: Idp, source: JwksKeys) -> None:
    with capture_logs() as logs:
        await source.start()
    keys = await source.keys("k1")
    assert verify(K1.sign(CLAIMS), keys, RULE, NOW)["sub"] == "alice"
    assert idp.hits == 1
    assert [entry["event"] for entry in logs] == ["jwks_refreshed"]
    assert logs[0]["keys"] == 1
    assert logs[0]["kids"] == ["k1"]
    assert idp.headers[0]["Accept"].startswith("application/jwk-set+json")
    # A known kid never causes a fetch, however often it is asked for.
    for _ in range(50):
        await source.keys("k1")
    assert idp.hits == 1


async def test_rotation_is_picked_up_by_unknown_kid_refetch(idp: Idp, source: JwksKeys, clock: Clock) -> None:
    await source.start()
    token = K2.sign(CLAIMS)
    with pytest.raises(Unauthenticated) as caught:
        verify(token, await source.keys("k2"), RULE, NOW)  # rotated within min_refetch_interval: not yet
    assert caught.value.reason == "unknown_kid"
    assert idp.hits == 1

    idp.doc = jwks(K1, K2)
    clock.now += 10
    keys = await source.keys("k2")
    assert idp.hits == 2
    assert keys.kids == {"k1", "k2"}
    assert verify(token, keys, RULE, NOW)["sub"] == "alice"


async def test_unknown_kid_flood_fetches_once_per_interval(idp: Idp, source: JwksKeys, clock: Clock) -> None:
    await source.start()
    clock.now += 11
    idp.delay = 0.1  # long enough that the whole flood arrives while one fetch is in flight
    results = await asyncio.gather(*(source.keys(f"random-{i}") for i in range(300)))
    assert idp.hits == 2
    assert all(keys.kids == {"k1"} for keys in results)

    idp.delay = 0
    for i in range(300):  # after the fetch, within min_refetch_interval: answered from the cache
        await source.keys(f"later-{i}")
    clock.now += 9.9
    await source.keys("still-too-soon")
    assert idp.hits == 2

    clock.now += 0.1
    await asyncio.gather(*(source.keys(f"next-{i}") for i in range(100)))
    assert idp.hits == 3
    assert source.fetches == 3


async def test_idp_down_after_good_fetch_keeps_old_keys(idp: Idp, source: JwksKeys, clock: Clock) -> None:
    await source.start()
    idp.status = 503
    with capture_logs() as logs:
        for _ in range(3):
            clock.now += 11
            keys = await source.keys("k9")
            assert verify(K1.sign(CLAIMS), keys, RULE, NOW)["sub"] == "alice"
    assert idp.hits == 4
    failures = [entry for entry in logs if entry["event"] == "jwks_fetch_failed"]
    assert len(failures) == 1  # once per state change, not once per retry
    assert failures[0]["error"] == "HTTP 503"
    assert failures[0]["keeping_previous_keys"] is True

    idp.status = 200
    idp.doc = jwks(K1, K2)
    with capture_logs() as logs:
        clock.now += 11
        keys = await source.keys("k2")
    assert keys.kids == {"k1", "k2"}
    assert [entry["event"] for entry in logs] == ["jwks_refreshed"]


async def test_idp_unreachable_keeps_old_keys(clock: Clock) -> None:
    server = Idp()
    await server.start()
    source = JwksKeys(server.url, min_refetch_interval=10, fetch_timeout=1, clock=clock)
    try:
        await source.start()
        await server.stop()  # connection refused from now on
        clock.now += 11
        with capture_logs() as logs:
            keys = await source.keys("k9")
        assert keys.kids == {"k1"}
        assert logs[0]["event"] == "jwks_fetch_failed"
        assert "ClientConnectorError" in logs[0]["error"]
    finally:
        await source.close()


async def test_idp_down_from_start_then_recovers_in_background(idp: Idp) -> None:
    idp.status = 500
    source = JwksKeys(idp.url, refresh_interval=0.4, min_refetch_interval=3600, retry_initial=0.05)
    try:
        with capture_logs() as logs:
            await source.start()  # does not raise
            with pytest.raises(Unauthenticated) as caught:
                await source.keys("k1")
            assert caught.value.reason == "keys_unavailable"

            async def retried() -> bool:  # backoff 0.05, 0.1, 0.2...: a few retries, still one log line
                return idp.hits >= 4

            await eventually(retried)
            idp.status = 200

            async def loaded() -> bool:
                try:
                    return "k1" in (await source.keys("k1")).kids
                except Unauthenticated:
                    return False

            await eventually(loaded)
        events = [entry["event"] for entry in logs]
        assert events == ["jwks_fetch_failed", "jwks_refreshed"]
    finally:
        await source.close()


async def test_background_refresh_picks_up_new_document(idp: Idp) -> None:
    source = JwksKeys(idp.url, refresh_interval=0.1, min_refetch_interval=3600)
    try:
        await source.start()
        idp.doc = jwks(K2)

        async def rotated() -> bool:
            return (await source.keys("k2")).kids == {"k2"}

        await eventually(rotated)
    finally:
        await source.close()


async def test_never_loaded_keys_refetch_on_demand(idp: Idp, clock: Clock) -> None:
    idp.status = 404
    source = JwksKeys(idp.url, refresh_interval=3600, min_refetch_interval=10, clock=clock, retry_initial=3600)
    try:
        await source.start()
        idp.status = 200
        with pytest.raises(Unauthenticated):
            await source.keys("k1")  # within min_refetch_interval of the failed fetch
        clock.now += 10
        assert (await source.keys("k1")).kids == {"k1"}
        assert idp.hits == 2
    finally:
        await source.close()


BIG = {"keys": [K1.jwk()], "padding": "x" * (1 << 20)}


@pytest.mark.parametrize(
    ("doc", "chunked", "error"),
    [
        pytest.param(json.dumps(BIG).encode(), False, "exceeds 1048576", id="oversized"),
        pytest.param(json.dumps(BIG).encode(), True, "exceeds 1048576 bytes", id="oversized-chunked"),
        pytest.param(b"<html>login</html>", False, "not JSON", id="html"),
        pytest.param(b'{"keys": [', False, "not JSON", id="truncated-json"),
        pytest.param(b"\xff\xfe", False, "not JSON", id="not-utf8"),
        pytest.param(b"[" * 100_000, False, "not JSON", id="deeply-nested"),
        pytest.param(b'{"keys": []}', False, "no usable", id="empty-set"),
        pytest.param(
            json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).encode(), False, "no usable", id="only-symmetric"
        ),
        pytest.param(b'"keys"', False, "not a JWKS document", id="json-string"),
    ],
)
async def test_bad_responses_are_refused(idp: Idp, doc: bytes, chunked: bool, error: str) -> None:
    idp.doc = doc
    idp.chunked = chunked
    source = JwksKeys(idp.url, retry_initial=3600)
    try:
        with capture_logs() as logs:
            await source.start()
        with pytest.raises(Unauthenticated) as caught:
            await source.keys("k1")
        assert caught.value.reason == "keys_unavailable"
        assert logs[0]["event"] == "jwks_fetch_failed"
        assert error in logs[0]["error"]
    finally:
        await source.close()


async def test_skipped_keys_are_logged_without_key_material(idp: Idp) -> None:
    idp.doc = {"keys": [K1.jwk(), RSA.jwk(use="enc")]}
    source = JwksKeys(idp.url, retry_initial=3600)
    try:
        with capture_logs() as logs:
            await source.start()
        assert (await source.keys("k1")).kids == {"k1"}
        skipped = [entry for entry in logs if entry["event"] == "jwks_keys_skipped"]
        assert skipped[0]["skipped"] == ["keys[1]: kid 'r1': use is not sig"]
        assert RSA.jwk()["n"][:20] not in repr(logs)
    finally:
        await source.close()


async def test_slow_idp_times_out(idp: Idp) -> None:
    idp.delay = 1.0
    source = JwksKeys(idp.url, fetch_timeout=0.1, retry_initial=3600)
    try:
        with capture_logs() as logs:
            await source.start()
        assert logs[0]["error"] == "timed out"
    finally:
        await source.close()


async def test_credentials_in_url_are_not_logged(idp: Idp) -> None:
    idp.status = 500
    url = idp.url.replace("http://", "http://user:s3cret@") + "?token=s3cret"
    source = JwksKeys(url, retry_initial=3600)
    try:
        with capture_logs() as logs:
            await source.start()
        assert "s3cret" not in repr(logs)
        assert logs[0]["url"] == idp.url
    finally:
        await source.close()


async def test_session_ownership(idp: Idp) -> None:
    async with aiohttp.ClientSession() as session:
        source = JwksKeys(idp.url, session=session)
        await source.start()
        await source.close()
        assert not session.closed  # not ours to close
        async with session.get(idp.url) as response:
            assert response.status == 200

    owned = JwksKeys(idp.url)
    await owned.start()
    session_of_owned = owned._session
    await owned.close()
    assert session_of_owned is not None
    assert session_of_owned.closed


async def test_cancelled_caller_does_not_cancel_shared_fetch(idp: Idp, clock: Clock) -> None:
    source = JwksKeys(idp.url, refresh_interval=3600, min_refetch_interval=10, clock=clock)
    try:
        await source.start()
        idp.doc = jwks(K1, K2)
        idp.delay = 0.2
        clock.now += 11
        first = asyncio.create_task(source.keys("k2"))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(source.keys("k2"))
        await asyncio.sleep(0.05)
        first.cancel()
        assert (await second).kids == {"k1", "k2"}
        assert idp.hits == 2
    finally:
        await source.close()


# --- StaticKeys --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(K1.public_pem(), id="pem"),
        pytest.param(K1.public_pem() + RSA.public_pem(), id="pem-bundle"),
        pytest.param(json.dumps(jwks(K1, RSA)).encode(), id="jwks-json"),
        pytest.param(b"\n  " + json.dumps(jwks(K1)).encode(), id="jwks-json-leading-space"),
    ],
)
async def test_static_keys_from_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "keys"
    path.write_bytes(content)
    source = StaticKeys.from_file(path)
    await source.start()
    keyset = await source.keys("k1")
    kid = "k1" if b"keys" in content else next(iter(KeySet.from_pem(K1.public_pem()).kids))
    assert verify(K1.sign(CLAIMS, headers={"kid": kid}), keyset, RULE, NOW)["sub"] == "alice"
    await source.close()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read key file"),
        (b"", "no PEM block found"),
        (b"{not json", "not valid JSON"),
        (b'{"keys": []}', "JWKS has no usable signature verification key"),
        (
            b"-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
            "PEM block 0 is a private key; configure the public key only",
        ),
    ],
)
def test_static_keys_errors_name_the_file(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "idp.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{path}: ")) as caught:
        StaticKeys.from_file(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)
