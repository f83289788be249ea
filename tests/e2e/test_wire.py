"""What a real `meshgate run` puts on the wire (CONTRACT 4): headers both ways, path normalization, listener limits,
local replies and routing, seen from outside through two upstream processes that echo what they received.

One gateway serves the whole module; its routes are listed in ``ROUTES``. Requests whose bytes matter (hop-by-hop
headers, dot segments, over-long lines) are written on a raw socket so no client library normalizes them first.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.procs import Gateway, base_config, free_port, gateway, raw_http

pytestmark = pytest.mark.e2e

MAX_REQUEST_LINE = 1024
MAX_HEADER_SIZE = 2048
MAX_HEADERS = 32
ROUTE_TIMEOUT_MS = 200

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")

# First match wins, in this order. "a" and "b" are the two upstream processes (their echo names them).
ROUTES: list[dict[str, Any]] = [
    {"name": "exact", "match": {"path": "/exact"}, "cluster": "a"},
    {"name": "regex", "match": {"path_regex": "/items/[0-9]+"}, "cluster": "a"},
    {"name": "m-post", "match": {"path_prefix": "/m", "methods": ["POST"]}, "cluster": "a"},
    {"name": "m-any", "match": {"path_prefix": "/m"}, "cluster": "b"},
    {
        "name": "h-debug",
        "match": {"path_prefix": "/hdr", "headers": [{"name": "X-Debug", "exact": "1"}]},
        "cluster": "b",
    },
    {"name": "h-any", "match": {"path_prefix": "/hdr"}, "cluster": "a"},
    {
        "name": "tenant",
        "match": {"path_prefix": "/host", "host": "*.example.test"},
        "cluster": "b",
        "rewrite": {"host": "internal.example"},
    },
    {"name": "host-any", "match": {"path_prefix": "/host"}, "cluster": "a"},
    {"name": "orders", "match": {"path_prefix": "/orders"}, "cluster": "a", "rewrite": {"prefix": "/v2/orders"}},
    {
        "name": "split",
        "match": {"path_prefix": "/split"},
        "split": [{"cluster": "a", "weight": 90}, {"cluster": "b", "weight": 10}],
    },
    {"name": "public", "match": {"path_prefix": "/public"}, "cluster": "a"},
    {"name": "upload", "match": {"path": "/upload"}, "cluster": "a"},
    {"name": "bytes", "match": {"path_prefix": "/bytes/"}, "cluster": "a"},
    {"name": "status", "match": {"path_prefix": "/status/"}, "cluster": "a"},
    {"name": "slow", "match": {"path_prefix": "/delay/"}, "cluster": "a", "timeout": f"{ROUTE_TIMEOUT_MS}ms"},
    {"name": "down", "match": {"path_prefix": "/down"}, "cluster": "down"},
]


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, upstream_a: int, upstream_b: int) -> Iterator[Gateway]:
    config = base_config(
        free_port(),
        free_port(),
        clusters=[
            {"name": "a", "endpoints": [f"127.0.0.1:{upstream_a}"]},
            {"name": "b", "endpoints": [f"127.0.0.1:{upstream_b}"]},
            {"name": "down", "endpoints": [f"127.0.0.1:{free_port()}"]},  # nothing listens there
        ],
        routes=ROUTES,
    )
    config["limits"] = {
        "max_request_line": MAX_REQUEST_LINE,
        "max_header_size": MAX_HEADER_SIZE,
        "max_headers": MAX_HEADERS,
    }
    with gateway(tmp_path_factory.mktemp("wire"), config) as running:
        yield running


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def _session(**connector: Any) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(**connector),
        timeout=aiohttp.ClientTimeout(total=20),
        auto_decompress=False,
    )


async def _echo(gw: Gateway, path: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> Any:
    """Send through the gateway to an upstream echo; return what the upstream saw (and assert it answered)."""
    url = URL(gw.url + path, encoded=True)  # as written: yarl would otherwise re-quote the query
    async with _session() as session, session.request(method, url, headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.headers["x-request-id"]
        return await response.json()


async def _raw_echo(gw: Gateway, target: str, headers: str = "") -> Any:
    """Send a GET for ``target`` with extra header lines byte for byte; return what the upstream saw."""
    request = f"GET {target} HTTP/1.1\r\nHost: gw.test\r\n{headers}Connection: close\r\n\r\n".encode()
    status, response_headers, body = await raw_http(gw.listen, request)
    assert status == 200, body
    assert response_headers["x-request-id"]
    return json.loads(body)


def _assert_local_reply(status: int, headers: Any, body: bytes, want_status: int, code: str) -> dict[str, Any]:
    """The contract's local reply: status, JSON content type, the four keys, and the same request id as the header."""
    assert status == want_status, body
    assert headers["content-type"].split(";")[0] == "application/json"
    reply: dict[str, Any] = json.loads(body)
    assert reply["error"] == code
    assert {"error", "message", "request_id", "trace_id"} <= set(reply)
    assert isinstance(reply["message"], str)
    assert reply["message"]
    assert reply["request_id"] == headers["x-request-id"]
    return reply


async def _raw_local_reply(gw: Gateway, request: bytes, want_status: int, code: str) -> dict[str, Any]:
    status, headers, body = await raw_http(gw.listen, request)
    return _assert_local_reply(status, headers, body, want_status, code)


async def _get_local_reply(gw: Gateway, path: str, want_status: int, code: str) -> dict[str, Any]:
    async with _session() as session, session.get(gw.url + path) as response:
        return _assert_local_reply(response.status, response.headers, await response.read(), want_status, code)


# --------------------------------------------------------------------------------------------------------------------
# Headers to the upstream
# --------------------------------------------------------------------------------------------------------------------


async def test_hop_by_hop_headers_are_not_forwarded(gw: Gateway) -> None:
    seen = await _raw_echo(
        gw,
        "/public/hop",
        "Connection: keep-alive, X-Custom, Upgrade, HTTP2-Settings\r\n"
        "X-Custom: for-this-hop-only\r\n"
        "Keep-Alive: timeout=5, max=100\r\n"
        "TE: trailers, deflate\r\n"
        "Upgrade: h2c\r\n"
        "HTTP2-Settings: AAMAAABkAAQAAP__\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
        "Trailer: X-Checksum\r\n"
        "X-End-To-End: kept\r\n",
    )
    headers = seen["headers"]
    for name in ("x-custom", "http2-settings", "keep-alive", "te", "upgrade", "proxy-connection",
                 "proxy-authorization", "trailer"):  # fmt: skip
        assert name not in headers, f"{name} reached the upstream: {headers}"
    # The gateway may say keep-alive on its own hop, but nothing of the client's Connection value travels on.
    assert headers.get("connection", "keep-alive").lower() in ("keep-alive", "close")
    assert headers["x-end-to-end"] == "kept"
    assert headers["host"] == "gw.test"
    assert seen["method"] == "GET"


async def test_x_forwarded_for_is_appended_to_the_clients(gw: Gateway) -> None:
    seen = await _echo(gw, "/public/xff", headers={"X-Forwarded-For": "203.0.113.7, 198.51.100.2"})
    assert seen["headers"]["x-forwarded-for"] == "203.0.113.7, 198.51.100.2, 127.0.0.1"

    seen = await _echo(gw, "/public/xff")
    assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"


async def test_x_forwarded_proto_and_host(gw: Gateway) -> None:
    # The gateway is the edge: it knows the scheme, a client's claim is overwritten.
    seen = await _raw_echo(gw, "/public/xf", "X-Forwarded-Proto: https\r\n")
    assert seen["headers"]["x-forwarded-proto"] == "http"
    assert seen["headers"]["x-forwarded-host"] == "gw.test"  # the Host the client sent


@pytest.mark.parametrize("sent", ["abc-123", "Req.42:retry_1", "x" * 128])
async def test_sane_request_id_is_kept(gw: Gateway, sent: str) -> None:
    async with _session() as session, session.get(f"{gw.url}/public/rid", headers={"x-request-id": sent}) as response:
        seen = await response.json()
        assert response.headers["x-request-id"] == sent
    assert seen["headers"]["x-request-id"] == sent


@pytest.mark.parametrize(
    "sent",
    [None, "", "a b", "x" * 300, "<script>alert(1)</script>", "id;drop", "ü-ünicode", "a,b"],
    ids=["absent", "empty", "space", "300-chars", "markup", "semicolon", "non-ascii", "comma"],
)
async def test_missing_or_malicious_request_id_is_replaced_by_a_uuid(gw: Gateway, sent: str | None) -> None:
    extra = "" if sent is None else f"x-request-id: {sent}\r\n"
    request = f"GET /public/rid HTTP/1.1\r\nHost: gw.test\r\n{extra}Connection: close\r\n\r\n".encode()
    status, headers, body = await raw_http(gw.listen, request)
    assert status == 200, body
    generated = headers["x-request-id"]
    assert UUID4.fullmatch(generated), generated
    assert json.loads(body)["headers"]["x-request-id"] == generated  # the upstream got the same one


async def test_generated_request_ids_differ(gw: Gateway) -> None:
    async with _session() as session:
        ids = set()
        for _ in range(5):
            async with session.get(f"{gw.url}/nowhere") as response:
                ids.add(response.headers["x-request-id"])
    assert len(ids) == 5


@pytest.mark.parametrize(
    ("request_bytes", "want_status"),
    [
        (b"GET /public/ok HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", 200),  # proxied
        (b"GET /status/503 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", 503),  # the upstream's own error
        (b"HEAD /bytes/10 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", 200),
        (b"GET /nowhere HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", 404),  # local replies from here on
        (b"GET /public/%zz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", 400),
        (b"GET /down HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", 502),
        (b"GET /delay/1000 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", 504),
        (b"GET /public/" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1\r\nHost: gw\r\n\r\n", 400),  # the parser's own
        (b"BROKEN\r\n\r\n", 400),
    ],
    ids=["proxied", "upstream-503", "head", "404", "bad-escape", "502", "504", "line-too-long", "garbage"],
)
async def test_every_response_carries_a_request_id(gw: Gateway, request_bytes: bytes, want_status: int) -> None:
    status, headers, _ = await raw_http(gw.listen, request_bytes)
    assert status == want_status
    assert headers.get("x-request-id")


# --------------------------------------------------------------------------------------------------------------------
# Path normalization
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin",
        "/public/..%2Fadmin",
        "/public/..%2fadmin",
        "/public/..%5Cadmin",
        "//public/../admin",
        "/public/./../admin",
        "/public/a/../../admin",
        "/public/../../../admin",
    ],
)
async def test_dot_segments_cannot_escape_a_prefix_route(gw: Gateway, target: str) -> None:
    # Routed as /admin, which has no route. Were the raw path routed, "/public" would match and proxy it.
    await _raw_local_reply(
        gw, f"GET {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode(), 404, "route_not_found"
    )


@pytest.mark.parametrize(
    ("target", "upstream_path", "upstream_query"),
    [
        ("/public//a/./b", "/public/a/b", ""),
        ("/public/a/../b", "/public/b", ""),
        ("/public/../public/x", "/public/x", ""),
        ("/public/%61%62c", "/public/abc", ""),  # escaped unreserved characters are decoded
        ("/public/a%20b", "/public/a%20b", ""),  # other escapes are kept
        ("/public/x?next=/../admin&q=%zz", "/public/x", "next=/../admin&q=%zz"),  # the query is not a path
    ],
)
async def test_the_upstream_sees_the_normalized_path(
    gw: Gateway, target: str, upstream_path: str, upstream_query: str
) -> None:
    seen = await _raw_echo(gw, target)
    assert (seen["path"], seen["query"]) == (upstream_path, upstream_query)


@pytest.mark.parametrize("target", ["/public/%zz", "/public/%G1", "/public/%4", "/public/a%", "/public/%00"])
async def test_invalid_percent_encoding_is_400(gw: Gateway, target: str) -> None:
    await _raw_local_reply(
        gw, f"GET {target} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode(), 400, "bad_request"
    )


# --------------------------------------------------------------------------------------------------------------------
# Listener limits
# --------------------------------------------------------------------------------------------------------------------


def _request_line_of(length: int) -> bytes:
    """``GET /public/aaa... HTTP/1.1`` exactly ``length`` bytes long (without CRLF)."""
    fixed = len(b"GET /public/ HTTP/1.1")
    return b"GET /public/" + b"a" * (length - fixed) + b" HTTP/1.1"


async def test_request_line_within_the_limit_is_served(gw: Gateway) -> None:
    status, _, _ = await raw_http(gw.listen, _request_line_of(MAX_REQUEST_LINE - 100) + b"\r\nHost: gw\r\n\r\n")
    assert status == 200


async def test_request_line_over_the_limit_is_400_json(gw: Gateway) -> None:
    await _raw_local_reply(gw, _request_line_of(MAX_REQUEST_LINE + 100) + b"\r\nHost: gw\r\n\r\n", 400, "bad_request")


async def test_header_within_the_limit_is_served(gw: Gateway) -> None:
    value = b"v" * (MAX_HEADER_SIZE - 200)
    status, _, body = await raw_http(gw.listen, b"GET /public/h HTTP/1.1\r\nHost: gw\r\nX-Big: " + value + b"\r\n\r\n")
    assert status == 200
    assert json.loads(body)["headers"]["x-big"] == value.decode()


async def test_header_over_the_limit_is_400_json(gw: Gateway) -> None:
    value = b"v" * (MAX_HEADER_SIZE + 200)
    await _raw_local_reply(
        gw, b"GET /public/h HTTP/1.1\r\nHost: gw\r\nX-Big: " + value + b"\r\n\r\n", 400, "bad_request"
    )


def _with_headers(count: int) -> bytes:
    """A GET with Host plus ``count - 1`` more headers (``count`` in all)."""
    extra = b"".join(b"X-H%d: %d\r\n" % (i, i) for i in range(count - 1))
    return b"GET /public/many HTTP/1.1\r\nHost: gw\r\n" + extra + b"\r\n"


async def test_headers_up_to_the_limit_are_served(gw: Gateway) -> None:
    status, _, _ = await raw_http(gw.listen, _with_headers(MAX_HEADERS - 4))
    assert status == 200


async def test_too_many_headers_is_400_json(gw: Gateway) -> None:
    await _raw_local_reply(gw, _with_headers(MAX_HEADERS + 10), 400, "bad_request")


# --------------------------------------------------------------------------------------------------------------------
# Local replies
# --------------------------------------------------------------------------------------------------------------------


async def test_unknown_path_is_404_route_not_found(gw: Gateway) -> None:
    await _get_local_reply(gw, "/nowhere/at/all", 404, "route_not_found")


async def test_cluster_endpoint_down_is_502(gw: Gateway) -> None:
    await _get_local_reply(gw, "/down/x", 502, "upstream_unavailable")


async def test_route_timeout_is_504_within_a_second(gw: Gateway) -> None:
    started = time.monotonic()
    await _get_local_reply(gw, "/delay/2000", 504, "upstream_timeout")
    elapsed = time.monotonic() - started
    assert ROUTE_TIMEOUT_MS / 1000 <= elapsed < 1.0


async def test_upstream_within_the_route_timeout_answers(gw: Gateway) -> None:
    seen = await _echo(gw, "/delay/10")
    assert seen == {"instance": "a", "delayed_ms": 10}


# --------------------------------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------------------------------


async def _route_of(gw: Gateway, path: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> str:
    """Which upstream answered (``a``/``b``), or the local reply's code."""
    async with _session() as session, session.request(method, gw.url + path, headers=headers) as response:
        if "x-upstream-instance" in response.headers:
            return response.headers["x-upstream-instance"]
        return str((await response.json())["error"])


@pytest.mark.parametrize(
    ("method", "path", "headers", "want"),
    [
        ("GET", "/exact", None, "a"),
        ("GET", "/exact/more", None, "route_not_found"),  # exact means exact
        ("GET", "/exactly", None, "route_not_found"),
        ("GET", "/items/42", None, "a"),
        ("GET", "/items/42x", None, "route_not_found"),  # the regex must match the whole path
        ("GET", "/items/", None, "route_not_found"),
        ("POST", "/m/1", None, "a"),  # m-post and m-any both match: the first one wins
        ("GET", "/m/1", None, "b"),
        ("DELETE", "/m/1", None, "b"),
        ("GET", "/hdr", {"X-Debug": "1"}, "b"),
        ("GET", "/hdr", {"x-debug": "1"}, "b"),  # header names are case-insensitive
        ("GET", "/hdr", {"X-Debug": "2"}, "a"),
        ("GET", "/hdr", None, "a"),
        ("GET", "/host", {"Host": "api.example.test"}, "b"),
        ("GET", "/host", {"Host": "API.Example.Test:8443"}, "b"),  # case and port do not matter
        ("GET", "/host", {"Host": "example.test"}, "a"),  # "*." needs a label in front
        ("GET", "/host", {"Host": "api.example.test.evil"}, "a"),
    ],
)
async def test_route_matching(gw: Gateway, method: str, path: str, headers: dict[str, str] | None, want: str) -> None:
    assert await _route_of(gw, path, method=method, headers=headers) == want


@pytest.mark.parametrize(
    ("path", "upstream_path", "upstream_query"),
    [
        ("/orders", "/v2/orders", ""),
        ("/orders/7", "/v2/orders/7", ""),
        ("/orders/7/items?limit=5&x=%2F", "/v2/orders/7/items", "limit=5&x=%2F"),
    ],
)
async def test_prefix_rewrite(gw: Gateway, path: str, upstream_path: str, upstream_query: str) -> None:
    seen = await _echo(gw, path)
    assert (seen["path"], seen["query"]) == (upstream_path, upstream_query)


async def test_host_rewrite(gw: Gateway) -> None:
    seen = await _echo(gw, "/host/x", headers={"Host": "api.example.test"})
    assert seen["instance"] == "b"
    assert seen["headers"]["host"] == "internal.example"
    assert seen["headers"]["x-forwarded-host"] == "api.example.test"  # the original stays visible

    seen = await _echo(gw, "/host/x", headers={"Host": "plain.test"})
    assert (seen["instance"], seen["headers"]["host"]) == ("a", "plain.test")


async def test_weighted_split_is_90_10(gw: Gateway) -> None:
    total = 2000
    counts: Counter[str] = Counter()
    async with _session(limit=32) as session:

        async def one() -> None:
            async with session.get(f"{gw.url}/split") as response:
                assert response.status == 200
                counts[response.headers["x-upstream-instance"]] += 1
                await response.read()

        await asyncio.gather(*(one() for _ in range(total)))
    assert set(counts) == {"a", "b"}
    assert sum(counts.values()) == total
    # ±3 points is 4.5 standard deviations of a binomial(2000, 0.9): a false failure about once in 10^5 runs.
    assert abs(counts["a"] / total - 0.9) <= 0.03, counts


async def test_chunked_response_passes_through_as_chunked(gw: Gateway) -> None:
    async with _session() as session:
        async with session.get(f"{gw.url}/bytes/100000?chunked=1") as response:
            assert response.status == 200
            assert response.headers["Transfer-Encoding"] == "chunked"
            assert "Content-Length" not in response.headers
            assert await response.read() == b"x" * 100000
        async with session.get(f"{gw.url}/bytes/100000") as response:
            assert response.headers["Content-Length"] == "100000"
            assert "Transfer-Encoding" not in response.headers
            assert await response.read() == b"x" * 100000


async def test_head_gets_headers_and_no_body_and_keeps_the_connection_usable(gw: Gateway) -> None:
    async with _session(limit=1) as session:  # one connection: a stray body byte would break the next request
        for _ in range(2):
            async with session.head(f"{gw.url}/bytes/1234") as response:
                assert response.status == 200
                assert response.headers["Content-Length"] == "1234"
                assert response.headers["x-request-id"]
                assert await response.read() == b""
        async with session.get(f"{gw.url}/bytes/5") as response:
            assert await response.read() == b"xxxxx"


async def test_gzip_request_body_reaches_the_upstream_untouched(gw: Gateway) -> None:
    compressed = gzip.compress(b"meshgate " * 50_000)
    headers = {"Content-Encoding": "gzip", "Content-Type": "text/plain"}
    async with _session() as session, session.post(f"{gw.url}/upload", data=compressed, headers=headers) as response:
        assert response.status == 200
        seen = await response.json()
    assert seen["length"] == len(compressed)
    assert seen["sha256"] == hashlib.sha256(compressed).hexdigest()
