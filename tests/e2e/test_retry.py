"""e2e: retries, timeouts, cluster thresholds and fallbacks through a real gateway and real upstream processes.

One gateway serves the module: a route (path prefix) per behaviour, rewritten to the upstream's own paths. The
upstreams' ``/flaky/{n}/{key}`` fails the first n requests per key (503 with ``Retry-After``, or a reset) and
then answers with the body's sha256; ``/_count?path=`` says how many requests an instance really received, so
each test can tell "retried" from "not retried" on the upstream's side, not only from the client's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.procs import Gateway, gateway, metric_sum, upstream

pytestmark = pytest.mark.e2e

SLOW_MS = 2000  # the slow instance's delay on every answer: far past every per-try timeout below
FALLBACK_BODY = '{"error": "orders_unavailable"}'
NO_BREAKER = {"consecutive_failures": 0}  # keep failing endpoints in rotation: the tests count exact attempts


# --- processes ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_upstream() -> Iterator[int]:
    """An upstream instance named ``slow`` that answers everything but /healthz after SLOW_MS."""
    with upstream("slow", extra_args=("--delay-ms", str(SLOW_MS))) as port:
        yield port


@pytest.fixture(scope="module")
def refused_port() -> Iterator[int]:
    """A port that refuses connections: bound (so no other test can take it) but not listening, so the kernel
    answers a SYN with RST at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def blackhole_port() -> Iterator[int]:
    """A port where connecting times out: a listener whose accept queue is full and never drained, so the kernel
    drops further SYNs (``connect-failure``, unlike the RST of ``refused``)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        fillers = []
        for _ in range(3):  # a backlog of 0 still queues one connection; more than enough to fill it
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.05)
        try:
            yield port
        finally:
            for filler in fillers:
                filler.close()


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory,
    upstream_a: int,
    upstream_b: int,
    slow_upstream: int,
    refused_port: int,
    blackhole_port: int,
) -> Iterator[Gateway]:
    a, b = f"127.0.0.1:{upstream_a}", f"127.0.0.1:{upstream_b}"
    slow, refused, blackhole = (f"127.0.0.1:{p}" for p in (slow_upstream, refused_port, blackhole_port))
    clusters: list[dict[str, Any]] = [
        {"name": "ab", "endpoints": [a, b], "circuit_breaker": NO_BREAKER},
        {"name": "solo", "endpoints": [a], "circuit_breaker": NO_BREAKER},
        {"name": "b-only", "endpoints": [b]},
        {"name": "refusing", "endpoints": [refused, a], "circuit_breaker": NO_BREAKER},
        {"name": "blackhole", "endpoints": [blackhole, a], "connect_timeout": "200ms", "circuit_breaker": NO_BREAKER},
        {"name": "slow-a", "endpoints": [slow, a], "circuit_breaker": NO_BREAKER},
        {"name": "slow-only", "endpoints": [slow], "circuit_breaker": NO_BREAKER},
        {"name": "narrow", "endpoints": [a], "circuit_breaker": {"max_requests": 2}},
        {"name": "dead", "endpoints": [refused]},  # default breaker: trips after 5 failures (circuit_open)
    ]
    static = {
        "status": 503,
        "headers": {"content-type": "application/json", "retry-after": "30", "x-fallback": "static"},
        "body": FALLBACK_BODY,
    }
    statuses_503 = {"attempts": 2, "on": ["503"]}
    routes: list[tuple[str, str, dict[str, Any]]] = [
        ("refused", "refusing", {"retry": {"attempts": 2, "on": ["refused"]}}),
        ("connect", "blackhole", {"retry": {"attempts": 2, "on": ["connect-failure"]}}),
        ("post", "solo", {"retry": {"attempts": 3, "on": ["reset", "503"]}}),
        (
            "post-ok",
            "solo",
            {"retry": {"attempts": 3, "on": ["reset", "503"], "non_idempotent": True, "max_replay_body": "1KiB"}},
        ),
        ("get", "ab", {"retry": statuses_503}),
        ("ra-long", "solo", {"timeout": "3s", "retry": statuses_503}),
        ("ra-short", "solo", {"timeout": "1s", "retry": statuses_503}),
        (
            "per-try",
            "slow-a",
            {"timeout": "3s", "retry": {"attempts": 3, "per_try_timeout": "300ms", "on": ["timeout"]}},
        ),
        (
            "deadline",
            "slow-only",
            {"timeout": "600ms", "retry": {"attempts": 5, "per_try_timeout": "400ms", "on": ["timeout"]}},
        ),
        ("narrow", "narrow", {}),
        ("once", "solo", {}),
        ("fb-static", "dead", {"fallback": {"response": static}}),
        ("fb-cluster", "dead", {"fallback": {"cluster": "b-only"}}),
        ("fb-exhausted", "solo", {"retry": statuses_503, "fallback": {"response": static}}),
        (
            "fb-body",
            "solo",
            {"retry": {"attempts": 2, "on": ["reset"], "non_idempotent": True}, "fallback": {"cluster": "b-only"}},
        ),
        ("fb-streamed", "solo", {"fallback": {"cluster": "b-only"}}),
    ]
    config = {
        "service": "retry",
        "routes": [
            {
                "name": name,
                "match": {"path_prefix": f"/{name}/"},
                "cluster": cluster,
                "rewrite": {"prefix": "/"},
                **extra,
            }
            for name, cluster, extra in routes
        ],
        "clusters": clusters,
    }
    with gateway(tmp_path_factory.mktemp("retry"), config) as running:
        yield running


# --- helpers -----------------------------------------------------------------------------------------------------


class Reply:
    def __init__(self, status: int, headers: CIMultiDict[str], body: bytes, elapsed: float, request_id: str) -> None:
        self.status, self.headers, self.body, self.elapsed, self.request_id = status, headers, body, elapsed, request_id

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    session: aiohttp.ClientSession, method: str, url: str, data: bytes | AsyncIterator[bytes] | None = None
) -> Reply:
    """One request with its own x-request-id (to find its access-log line); the time it took."""
    request_id = uuid.uuid4().hex
    started = time.monotonic()
    async with session.request(method, url, data=data, headers={"x-request-id": request_id}) as response:
        body = await response.read()
        elapsed = time.monotonic() - started
        return Reply(response.status, response.headers.copy(), body, elapsed, request_id)


def read_log(gw: Gateway) -> list[dict[str, Any]]:
    lines = []
    for line in gw.log_path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue  # the last line may be half written
    return lines


def access_lines(gw: Gateway, request_ids: list[str], timeout: float = 5.0) -> dict[str, dict[str, Any]]:
    """The access-log line of each request id (lines are flushed every 0.5 s, so poll)."""
    deadline = time.monotonic() + timeout
    while True:
        found = {
            line["request_id"]: line
            for line in read_log(gw)
            if line.get("event") == "request" and line.get("request_id") in request_ids
        }
        if len(found) == len(set(request_ids)) or time.monotonic() > deadline:
            assert set(found) == set(request_ids), "access log lines missing"
            return found
        time.sleep(0.1)


async def metric(session: aiohttp.ClientSession, gw: Gateway, name: str, **labels: str) -> float:
    async with session.get(f"{gw.admin_url}/metrics") as response:
        return metric_sum(await response.text(), name, **labels)


async def received(session: aiohttp.ClientSession, port: int, path: str) -> int:
    """How many requests the upstream on ``port`` got for ``path``."""
    async with session.get(f"http://127.0.0.1:{port}/_count", params={"path": path}) as response:
        return int((await response.json())["count"])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_local_reply(reply: Reply, status: int, code: str) -> None:
    """The contract's JSON local reply, carrying the request id."""
    assert reply.status == status, (reply.status, reply.body)
    body = reply.json()
    assert body["error"] == code, body
    assert body["request_id"] == reply.request_id == reply.headers["x-request-id"]
    assert set(body) >= {"error", "message", "request_id", "trace_id"}


# --- retries -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("route", "kind"), [("refused", "refused"), ("connect", "connect-failure")])
async def test_connection_failure_is_retried_even_for_post(gw: Gateway, upstream_a: int, route: str, kind: str) -> None:
    # Nothing reached the dead endpoint, so the POST is re-sent although it is not idempotent; the body is bigger
    # than the replay buffer (64 KiB by default) and still arrives whole, since not one byte of it had been read.
    body = bytes(range(256)) * 800  # 200 KiB
    cluster = "refusing" if route == "refused" else "blackhole"
    async with aiohttp.ClientSession() as session:
        retries_before = await metric(session, gw, "meshgate_upstream_retries_total", upstream=cluster)
        replies = [await call(session, "POST", f"{gw.url}/{route}/upload", body) for _ in range(4)]
        retries_after = await metric(session, gw, "meshgate_upstream_retries_total", upstream=cluster)
    for reply in replies:
        assert reply.status == 200, reply.body
        assert reply.json()["sha256"] == sha256(body)
        assert reply.json()["length"] == len(body)
    lines = access_lines(gw, [reply.request_id for reply in replies])
    attempts = [line["attempts"] for line in lines.values()]
    assert 2 in attempts, attempts  # round robin sends requests to the dead endpoint first
    assert set(attempts) <= {1, 2}, attempts
    assert all(line["endpoint"] == f"127.0.0.1:{upstream_a}" for line in lines.values())
    assert retries_after - retries_before == attempts.count(2)


async def test_reset_and_503_are_not_retried_for_post_without_opt_in(gw: Gateway, upstream_a: int) -> None:
    async with aiohttp.ClientSession() as session:
        reset = await call(session, "POST", f"{gw.url}/post/flaky/1/post-reset?fail=reset", b"x" * 100)
        unavailable = await call(session, "POST", f"{gw.url}/post/flaky/1/post-503?retry_after=", b"x" * 100)
        # The same failure on a GET through the same route is retried: it is the method that stops the POST.
        get = await call(session, "GET", f"{gw.url}/post/flaky/1/get-503?retry_after=")
        counts = [await received(session, upstream_a, f"/flaky/1/{key}") for key in ("post-reset", "post-503")]
        get_count = await received(session, upstream_a, "/flaky/1/get-503")
    assert_local_reply(reset, 502, "upstream_unavailable")
    assert unavailable.status == 503  # the upstream's own answer, passed on
    assert unavailable.json() == {"instance": "a", "key": "post-503", "calls": 1}
    assert counts == [1, 1]
    assert (get.status, get_count) == (200, 2)
    lines = access_lines(gw, [reset.request_id, unavailable.request_id, get.request_id])
    assert [lines[r.request_id]["attempts"] for r in (reset, unavailable, get)] == [1, 1, 2]


async def test_reset_get_is_not_retried_when_the_route_does_not_ask(gw: Gateway, upstream_a: int) -> None:
    # The "solo" route's retry policy is attempts: 1, the default: one try, whatever failed.
    async with aiohttp.ClientSession() as session:
        reply = await call(session, "GET", f"{gw.url}/once/flaky/1/once-reset?fail=reset")
        count = await received(session, upstream_a, "/flaky/1/once-reset")
    assert (reply.status, count) == (502, 1)


async def test_post_is_retried_with_opt_in_and_the_same_bytes_arrive(gw: Gateway, upstream_a: int) -> None:
    small = bytes(range(256)) * 2  # 512 B: fits max_replay_body (1 KiB)
    async with aiohttp.ClientSession() as session:
        after_503 = await call(session, "POST", f"{gw.url}/post-ok/flaky/1/small-503?retry_after=", small)
        after_reset = await call(session, "POST", f"{gw.url}/post-ok/flaky/1/small-reset?fail=reset", small)
        counts = [await received(session, upstream_a, f"/flaky/1/{key}") for key in ("small-503", "small-reset")]
    for reply in (after_503, after_reset):
        assert reply.status == 200, reply.body
        assert (reply.json()["length"], reply.json()["sha256"], reply.json()["calls"]) == (len(small), sha256(small), 2)
    assert counts == [2, 2]
    lines = access_lines(gw, [after_503.request_id, after_reset.request_id])
    assert [line["attempts"] for line in lines.values()] == [2, 2]


async def test_post_larger_than_the_replay_buffer_is_sent_once(gw: Gateway, upstream_a: int) -> None:
    big = b"y" * 4096  # over max_replay_body (1 KiB): streamed, not kept

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the gateway finds out while buffering
        for _ in range(4):
            yield b"z" * 1024

    async with aiohttp.ClientSession() as session:
        unavailable = await call(session, "POST", f"{gw.url}/post-ok/flaky/1/big-503?retry_after=", big)
        reset = await call(session, "POST", f"{gw.url}/post-ok/flaky/1/big-reset?fail=reset", big)
        unavailable_chunked = await call(session, "POST", f"{gw.url}/post-ok/flaky/1/big-503c?retry_after=", chunked())
        keys = ("big-503", "big-reset", "big-503c")
        counts = [await received(session, upstream_a, f"/flaky/1/{key}") for key in keys]
    assert (unavailable.status, unavailable.json()["calls"]) == (503, 1)
    assert_local_reply(reset, 502, "upstream_unavailable")
    assert (unavailable_chunked.status, unavailable_chunked.json()["calls"]) == (503, 1)
    assert counts == [1, 1, 1]


async def test_get_is_retried_on_a_listed_status_on_another_endpoint(
    gw: Gateway, upstream_a: int, upstream_b: int
) -> None:
    # Instance a always answers 503; with 2 attempts every request still succeeds, so each retry went to b.
    url = f"{gw.url}/get/flaky/1000000/only-a?only=a&retry_after="
    async with aiohttp.ClientSession() as session:
        before = await metric(session, gw, "meshgate_upstream_retries_total", upstream="ab")
        replies = [await call(session, "GET", url) for _ in range(6)]
        after = await metric(session, gw, "meshgate_upstream_retries_total", upstream="ab")
        failed_on_a = await received(session, upstream_a, "/flaky/1000000/only-a")
    assert [reply.status for reply in replies] == [200] * 6
    assert {reply.json()["instance"] for reply in replies} == {"b"}
    lines = access_lines(gw, [reply.request_id for reply in replies])
    attempts = [line["attempts"] for line in lines.values()]
    assert 2 in attempts, attempts
    assert set(attempts) <= {1, 2}, attempts
    assert all(line["endpoint"] == f"127.0.0.1:{upstream_b}" for line in lines.values())
    assert after - before == attempts.count(2) == failed_on_a


# --- Retry-After ---------------------------------------------------------------------------------------------------


async def test_retry_after_is_honoured_within_the_deadline(gw: Gateway, upstream_a: int) -> None:
    async with aiohttp.ClientSession() as session:
        reply = await call(session, "GET", f"{gw.url}/ra-long/flaky/1/ra-1")  # 503 + Retry-After: 1, then 200
        count = await received(session, upstream_a, "/flaky/1/ra-1")
    assert (reply.status, count) == (200, 2)
    assert 1.0 <= reply.elapsed < 2.0, reply.elapsed  # waited the full second, not a 25 ms backoff


async def test_retry_after_past_the_deadline_is_not_waited_for(gw: Gateway, upstream_a: int) -> None:
    # Retry-After: 2 with a 1 s route timeout: waiting could only end in a 504, so the 503 goes back at once.
    async with aiohttp.ClientSession() as session:
        reply = await call(session, "GET", f"{gw.url}/ra-short/flaky/1/ra-2?retry_after=2")
        count = await received(session, upstream_a, "/flaky/1/ra-2")
    assert (reply.status, reply.headers["Retry-After"]) == (503, "2")
    assert reply.elapsed < 0.5, reply.elapsed
    assert count == 1


# --- timeouts ------------------------------------------------------------------------------------------------------


async def test_per_try_timeout_moves_the_retry_to_another_endpoint(gw: Gateway, upstream_a: int) -> None:
    async with aiohttp.ClientSession() as session:
        replies = [await call(session, "GET", f"{gw.url}/per-try/anything/{n}") for n in range(4)]
    assert [reply.status for reply in replies] == [200] * 4
    assert {reply.json()["instance"] for reply in replies} == {"a"}
    assert max(reply.elapsed for reply in replies) < 1.0  # 300 ms per try + backoff, never the slow 2 s
    lines = access_lines(gw, [reply.request_id for reply in replies])
    attempts = [line["attempts"] for line in lines.values()]
    assert 2 in attempts, attempts
    assert set(attempts) <= {1, 2}, attempts


async def test_route_timeout_gives_504_with_retries_left(gw: Gateway) -> None:
    # 400 ms per try, 600 ms in all, 5 attempts allowed: the second try is cut by the route deadline.
    async with aiohttp.ClientSession() as session:
        reply = await call(session, "GET", f"{gw.url}/deadline/anything")
    assert_local_reply(reply, 504, "upstream_timeout")
    assert 0.55 <= reply.elapsed < 1.2, reply.elapsed
    line = access_lines(gw, [reply.request_id])[reply.request_id]
    assert (line["status"], line["reason"], line["attempts"]) == (504, "upstream_timeout", 2)


# --- cluster thresholds ------------------------------------------------------------------------------------------


async def test_max_requests_refuses_the_overflow_at_once(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as session:
        replies = await asyncio.gather(*(call(session, "GET", f"{gw.url}/narrow/delay/600") for _ in range(5)))
    served = [reply for reply in replies if reply.status == 200]
    refused = [reply for reply in replies if reply.status != 200]
    assert len(served) == 2, [reply.status for reply in replies]
    for reply in refused:
        assert_local_reply(reply, 503, "circuit_open")
        assert reply.elapsed < 0.3, reply.elapsed  # refused at once, not queued behind the slow ones
    assert all(reply.elapsed >= 0.6 for reply in served)


# --- fallbacks -----------------------------------------------------------------------------------------------------


async def test_static_fallback_when_the_cluster_has_no_live_endpoint(gw: Gateway) -> None:
    # 7 requests: the first 5 fail to connect (upstream_unavailable), which trips the endpoint's breaker, so the
    # last ones find no endpoint at all (circuit_open); the fallback answers both.
    async with aiohttp.ClientSession() as session:
        before = await metric(session, gw, "meshgate_fallbacks_total", http_route="fb-static", kind="response")
        replies = [await call(session, "GET", f"{gw.url}/fb-static/x") for _ in range(7)]
        after = await metric(session, gw, "meshgate_fallbacks_total", http_route="fb-static", kind="response")
    for reply in replies:
        assert (reply.status, reply.body.decode()) == (503, FALLBACK_BODY)
        assert reply.headers["content-type"] == "application/json"
        assert (reply.headers["retry-after"], reply.headers["x-fallback"]) == ("30", "static")
        assert reply.headers["x-request-id"] == reply.request_id
    assert after - before == 7
    lines = access_lines(gw, [reply.request_id for reply in replies])
    assert {line["fallback"] for line in lines.values()} == {"response"}
    assert {line["status"] for line in lines.values()} == {503}
    assert {line["reason"] for line in lines.values()} <= {"upstream_unavailable", "circuit_open"}
    assert lines[replies[-1].request_id]["reason"] == "circuit_open"


async def test_fallback_cluster_answers_when_the_primary_is_down(gw: Gateway) -> None:
    async with aiohttp.ClientSession() as session:
        before = await metric(session, gw, "meshgate_fallbacks_total", http_route="fb-cluster", kind="cluster")
        replies = [await call(session, "GET", f"{gw.url}/fb-cluster/anything") for _ in range(3)]
        after = await metric(session, gw, "meshgate_fallbacks_total", http_route="fb-cluster", kind="cluster")
    assert [reply.status for reply in replies] == [200] * 3
    assert {reply.json()["instance"] for reply in replies} == {"b"}
    assert after - before == 3
    lines = access_lines(gw, [reply.request_id for reply in replies])
    assert {(line["fallback"], line["upstream"]) for line in lines.values()} == {("cluster", "b-only")}


async def test_fallback_after_retries_are_exhausted_on_a_listed_status(gw: Gateway, upstream_a: int) -> None:
    async with aiohttp.ClientSession() as session:
        before = await metric(session, gw, "meshgate_fallbacks_total", http_route="fb-exhausted", kind="response")
        reply = await call(session, "GET", f"{gw.url}/fb-exhausted/flaky/100/fx?retry_after=")
        after = await metric(session, gw, "meshgate_fallbacks_total", http_route="fb-exhausted", kind="response")
        count = await received(session, upstream_a, "/flaky/100/fx")
    assert (reply.status, reply.body.decode(), reply.headers["x-fallback"]) == (503, FALLBACK_BODY, "static")
    assert count == 2  # both attempts were made before the fallback answered
    assert after - before == 1
    line = access_lines(gw, [reply.request_id])[reply.request_id]
    assert (line["fallback"], line["attempts"]) == ("response", 2)


async def test_fallback_cluster_gets_the_body_the_failed_cluster_read(gw: Gateway, upstream_a: int) -> None:
    # Both tries on a read the whole (replayable) body and reset; the fallback cluster gets the same bytes.
    body = bytes(range(256)) * 20  # 5 KiB: within the default 64 KiB replay buffer
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        reply = await call(session, "POST", f"{gw.url}/fb-body/flaky/9/fb-body?fail=reset&only=a", body)
        count = await received(session, upstream_a, "/flaky/9/fb-body")
    assert reply.status == 200, reply.body
    assert (reply.json()["instance"], reply.json()["length"], reply.json()["sha256"]) == ("b", len(body), sha256(body))
    assert count == 2
    line = access_lines(gw, [reply.request_id])[reply.request_id]
    assert (line["fallback"], line["upstream"], line["attempts"]) == ("cluster", "b-only", 3)


async def test_fallback_cluster_is_skipped_when_the_body_is_gone(gw: Gateway) -> None:
    # No retries, so nothing is buffered: a streamed body the failed cluster consumed cannot go to the fallback
    # cluster, and the client gets the failure at once instead of a fallback that waits for bytes never sent.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        before = await metric(session, gw, "meshgate_fallbacks_total", http_route="fb-streamed")
        reply = await call(session, "POST", f"{gw.url}/fb-streamed/flaky/9/fb-streamed?fail=reset&only=a", b"s" * 5000)
        after = await metric(session, gw, "meshgate_fallbacks_total", http_route="fb-streamed")
    assert_local_reply(reply, 502, "upstream_unavailable")
    assert reply.elapsed < 1.0, reply.elapsed
    assert after == before
