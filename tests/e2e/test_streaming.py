"""Bodies through a real `meshgate run`: streamed both ways in flat memory, 100-continue, the body limit, WebSocket.

Two gateways share the module's upstream: ``big`` has no body limit (200 MB transfers, 100-continue, WebSocket);
``small`` has ``limits.max_body_size: 1MiB``. Both have a ``sentinel`` cluster: a listening socket in this process
that never accepts, reads or answers, so a test can see whether the gateway contacted the upstream at all, and an
upload to it shows whether the gateway holds the client back when the upstream does not read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.procs import (
    Gateway,
    base_config,
    free_port,
    gateway,
    proc_status_kib,
    raw_http,
    read_http_response,
)

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
BIG = 200 * MiB
CHUNK = 64 * 1024
# Peak resident growth allowed while 200 MB stream through: a few socket buffers and chunks, never the body.
RSS_GROWTH_LIMIT_KIB = 50 * 1024
SMALL_LIMIT = MiB
SENTINEL_TIMEOUT_MS = 300
# The client half of a WebSocket handshake (RFC 6455's example key), for requests written byte by byte.
WS_KEY_AND_VERSION = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory, upstream_a: int, sentinel: socket.socket) -> Iterator[Gateway]:
    config = base_config(
        free_port(),
        free_port(),
        clusters=[
            {"name": "a", "endpoints": [f"127.0.0.1:{upstream_a}"]},
            {"name": "down", "endpoints": [f"127.0.0.1:{free_port()}"]},  # nothing listens there
            {"name": "sentinel", "endpoints": [f"127.0.0.1:{sentinel.getsockname()[1]}"]},
        ],
        routes=[
            {"name": "upload", "match": {"path": "/upload"}, "cluster": "a"},
            {"name": "bytes", "match": {"path_prefix": "/bytes/"}, "cluster": "a"},
            {"name": "sentinel", "match": {"path": "/sentinel"}, "cluster": "sentinel", "timeout": "10s"},
            {"name": "ws", "match": {"path": "/ws"}, "cluster": "a"},
            {"name": "ws-down", "match": {"path": "/down/ws"}, "cluster": "down"},
            {"name": "echo", "match": {"path_prefix": "/echo"}, "cluster": "a"},
        ],
    )
    with gateway(tmp_path_factory.mktemp("big"), config) as gw:
        yield gw


@pytest.fixture(scope="module")
def sentinel() -> Iterator[socket.socket]:
    """A listening socket nobody accepts on: a connection the gateway opens waits in its backlog, where
    ``_sentinel_connections`` finds it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        yield listener


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, upstream_a: int, sentinel: socket.socket) -> Iterator[Gateway]:
    sentinel_port = sentinel.getsockname()[1]
    config = base_config(
        free_port(),
        free_port(),
        clusters=[
            {"name": "a", "endpoints": [f"127.0.0.1:{upstream_a}"]},
            {"name": "sentinel", "endpoints": [f"127.0.0.1:{sentinel_port}"]},
        ],
        routes=[
            {"name": "upload", "match": {"path": "/upload"}, "cluster": "a"},
            {
                "name": "sentinel",
                "match": {"path": "/sentinel"},
                "cluster": "sentinel",
                "timeout": f"{SENTINEL_TIMEOUT_MS}ms",
            },
        ],
    )
    config["limits"] = {"max_body_size": "1MiB"}
    with gateway(tmp_path_factory.mktemp("small"), config) as gw:
        yield gw


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class RssSamples:
    pid: int
    baseline_kib: int
    peak_resettable: bool
    samples_kib: list[int] = field(default_factory=list)

    @property
    def growth_kib(self) -> int:
        """Peak growth over the baseline: the highest sample or, when it could be reset at the start, the kernel's
        own peak (VmHWM), which also catches a spike between two samples."""
        peaks = [*self.samples_kib, proc_status_kib(self.pid, "VmHWM")] if self.peak_resettable else self.samples_kib
        return max(peaks) - self.baseline_kib


def _reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``clear_refs`` value 5, Linux >= 4.0); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@contextlib.asynccontextmanager
async def sample_rss(pid: int, every: float = 0.1) -> AsyncIterator[RssSamples]:
    """Sample the process's VmRSS every ``every`` seconds while the block runs; the baseline is VmRSS at entry."""
    resettable = _reset_peak_rss(pid)
    rss = RssSamples(pid, proc_status_kib(pid, "VmRSS"), resettable)

    async def sample() -> None:
        while True:
            rss.samples_kib.append(proc_status_kib(pid, "VmRSS"))
            await asyncio.sleep(every)

    task = asyncio.create_task(sample())
    try:
        yield rss
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        rss.samples_kib.append(proc_status_kib(pid, "VmRSS"))


def _block(index: int) -> bytes:
    """64 KiB that differ from block to block, so a dropped, repeated or reordered chunk changes the digest."""
    return index.to_bytes(8, "big") * (CHUNK // 8)


async def _generated_body(total: int, digest: Any) -> AsyncIterator[bytes]:
    sent = 0
    index = 0
    while sent < total:
        block = _block(index)[: total - sent]
        digest.update(block)
        sent += len(block)
        index += 1
        yield block


def _x_digest(total: int) -> str:
    """sha256 of the upstream's ``/bytes/{total}`` body (``total`` times ``x``)."""
    digest = hashlib.sha256()
    block = b"x" * CHUNK
    for offset in range(0, total, CHUNK):
        digest.update(block[: min(CHUNK, total - offset)])
    return digest.hexdigest()


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60), auto_decompress=False)


async def _warm_up(gw: Gateway) -> None:
    """One small upload and download first, so lazily built state (pools, buffers) is part of the baseline."""
    async with _session() as session:
        async with session.post(f"{gw.url}/upload", data=b"w" * CHUNK) as response:
            assert response.status == 200
        async with session.get(f"{gw.url}/bytes/{CHUNK}") as response:
            assert len(await response.read()) == CHUNK


def _sentinel_connections(listener: socket.socket) -> list[socket.socket]:
    """Accept every connection waiting on the sentinel (the caller closes them)."""
    accepted: list[socket.socket] = []
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return accepted
        accepted.append(conn)


def _assert_local_reply(status: int, headers: dict[str, str], body: bytes, want_status: int, code: str) -> None:
    assert status == want_status, body
    assert headers["content-type"].startswith("application/json")
    reply = json.loads(body)
    assert reply["error"] == code
    assert set(reply) >= {"error", "message", "request_id", "trace_id"}
    assert reply["request_id"] == headers["x-request-id"]


# --------------------------------------------------------------------------------------------------------------------
# 200 MB both ways, flat memory
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_200mb_upload_streams_intact_in_flat_memory(big: Gateway, framing: str) -> None:
    await _warm_up(big)
    sent = hashlib.sha256()
    headers = {"Content-Type": "application/octet-stream"}
    if framing == "content-length":
        headers["Content-Length"] = str(BIG)  # with a known length aiohttp streams the generator unchunked
    async with (
        sample_rss(big.process.pid) as rss,
        _session() as session,
        session.post(f"{big.url}/upload", data=_generated_body(BIG, sent), headers=headers) as response,
    ):
        assert response.status == 200
        seen = await response.json()

    assert seen["length"] == BIG
    assert seen["sha256"] == sent.hexdigest()
    if framing == "content-length":
        assert (seen["content_length"], seen["transfer_encoding"]) == (str(BIG), None)
    else:
        assert (seen["content_length"], seen["transfer_encoding"]) == (None, "chunked")
    assert rss.peak_resettable or len(rss.samples_kib) >= 3, "the transfer was too quick to sample"
    assert rss.growth_kib < RSS_GROWTH_LIMIT_KIB, f"gateway RSS grew {rss.growth_kib} KiB: {rss.samples_kib}"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_200mb_download_streams_intact_in_flat_memory(big: Gateway, framing: str) -> None:
    await _warm_up(big)
    query = "?chunked=1" if framing == "chunked" else ""
    received = hashlib.sha256()
    size = 0
    async with (
        sample_rss(big.process.pid) as rss,
        _session() as session,
        session.get(f"{big.url}/bytes/{BIG}{query}") as response,
    ):
        assert response.status == 200
        if framing == "chunked":
            assert response.headers["Transfer-Encoding"] == "chunked"
            assert "Content-Length" not in response.headers
        else:
            assert response.headers["Content-Length"] == str(BIG)
        async for chunk in response.content.iter_chunked(CHUNK):
            received.update(chunk)
            size += len(chunk)

    assert size == BIG
    assert received.hexdigest() == _x_digest(BIG)
    assert rss.peak_resettable or len(rss.samples_kib) >= 3, "the transfer was too quick to sample"
    assert rss.growth_kib < RSS_GROWTH_LIMIT_KIB, f"gateway RSS grew {rss.growth_kib} KiB: {rss.samples_kib}"


async def test_download_to_a_stalled_client_is_held_back_not_buffered(big: Gateway) -> None:
    """The client reads nothing for a while: the gateway must stop reading from the upstream, not buffer for it."""
    await _warm_up(big)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect(("127.0.0.1", big.listen))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        async with sample_rss(big.process.pid) as rss:
            writer.write(b"GET /bytes/%d HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n" % BIG)
            await writer.drain()
            await asyncio.sleep(1.5)  # a gateway without backpressure would pull all 200 MB into memory meanwhile
        stalled_growth = rss.growth_kib

        received = hashlib.sha256()
        size = 0
        await reader.readuntil(b"\r\n\r\n")
        async with asyncio.timeout(30):
            while chunk := await reader.read(1024 * 1024):
                received.update(chunk)
                size += len(chunk)
    finally:
        writer.close()
        await writer.wait_closed()

    assert size == BIG
    assert received.hexdigest() == _x_digest(BIG)
    assert stalled_growth < RSS_GROWTH_LIMIT_KIB, f"gateway RSS grew {stalled_growth} KiB: {rss.samples_kib}"


async def test_upload_to_a_stalled_upstream_holds_the_client_back(big: Gateway, sentinel: socket.socket) -> None:
    """The upstream (the sentinel) reads nothing: the gateway must stop reading the client's body, so the client
    can only fill socket buffers, not push 200 MB into the gateway."""
    await _warm_up(big)
    for conn in _sentinel_connections(sentinel):
        conn.close()
    block = b"s" * CHUNK
    accepted = 0
    _, writer = await asyncio.open_connection("127.0.0.1", big.listen)
    try:
        async with sample_rss(big.process.pid) as rss:
            writer.write(b"POST /sentinel HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n" % BIG)
            loop = asyncio.get_running_loop()
            until = loop.time() + 1.5
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(until):
                    while accepted < BIG:
                        writer.write(block)
                        await writer.drain()  # blocks once every buffer on the way is full
                        accepted += len(block)
    finally:
        writer.transport.abort()  # close() would first wait to flush what the stalled path cannot take
        for conn in _sentinel_connections(sentinel):
            conn.close()

    # Kernel socket buffers on four sockets (client, gateway x2, sentinel) hold a few MB each at most.
    assert accepted < 64 * MiB, f"{accepted} bytes left the client although the upstream read nothing"
    assert rss.growth_kib < RSS_GROWTH_LIMIT_KIB, f"gateway RSS grew {rss.growth_kib} KiB: {rss.samples_kib}"


# --------------------------------------------------------------------------------------------------------------------
# Expect: 100-continue
# --------------------------------------------------------------------------------------------------------------------


async def test_expect_100_continue_is_answered_before_the_body_is_sent(big: Gateway) -> None:
    body = bytes(range(256)) * 400
    reader, writer = await asyncio.open_connection("127.0.0.1", big.listen)
    try:
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        await writer.drain()
        # Nothing of the body has been sent: the gateway must invite it.
        status, _, _ = await read_http_response(reader, seconds=5)
        assert status == 100

        writer.write(body)
        await writer.drain()
        status, headers, payload = await read_http_response(reader)
    finally:
        writer.close()
        await writer.wait_closed()

    assert status == 200
    assert headers["x-request-id"]
    seen = json.loads(payload)
    assert seen["length"] == len(body)
    assert seen["sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize(
    ("path", "length", "want_status", "code"),
    [
        ("/upload", 2 * SMALL_LIMIT, 413, "payload_too_large"),
        ("/nowhere", 10, 404, "route_not_found"),
    ],
)
async def test_expect_100_continue_refused_gets_the_final_answer_without_100(
    small: Gateway, path: str, length: int, want_status: int, code: str
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", small.listen)
    try:
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
            % (path.encode(), length)
        )
        await writer.drain()
        status, headers, body = await read_http_response(reader, seconds=5)  # the first thing back is the answer
    finally:
        writer.close()
        await writer.wait_closed()

    _assert_local_reply(status, headers, body, want_status, code)


# --------------------------------------------------------------------------------------------------------------------
# limits.max_body_size
# --------------------------------------------------------------------------------------------------------------------


async def test_chunked_body_over_the_limit_gets_413_while_the_upstream_still_waits(small: Gateway) -> None:
    # 1.5 MiB of chunks and no last chunk: the body never ends, so the upstream (which answers /upload only after
    # the whole body) cannot have answered; the gateway must stop at 1 MiB and answer itself.
    chunk = b"c" * CHUNK
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    reader, writer = await asyncio.open_connection("127.0.0.1", small.listen)
    try:
        writer.write(b"POST /upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(24):
            writer.write(framed)
        await writer.drain()
        status, headers, body = await read_http_response(reader, seconds=5)
    finally:
        writer.close()
        await writer.wait_closed()

    _assert_local_reply(status, headers, body, 413, "payload_too_large")


async def test_chunked_body_under_the_limit_passes(small: Gateway) -> None:
    body = b"u" * (SMALL_LIMIT - 1)

    async def chunks() -> AsyncIterator[bytes]:
        for offset in range(0, len(body), CHUNK):
            yield body[offset : offset + CHUNK]

    async with _session() as session, session.post(f"{small.url}/upload", data=chunks()) as response:
        assert response.status == 200
        seen = await response.json()
    assert (seen["length"], seen["transfer_encoding"]) == (len(body), "chunked")


async def test_content_length_over_the_limit_gets_413_without_contacting_the_upstream(
    small: Gateway, sentinel: socket.socket
) -> None:
    for conn in _sentinel_connections(sentinel):  # start from an empty backlog
        conn.close()

    status, headers, body = await raw_http(
        small.listen,
        b"POST /sentinel HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (SMALL_LIMIT + 1),
        seconds=5,
    )
    _assert_local_reply(status, headers, body, 413, "payload_too_large")
    await asyncio.sleep(0.2)  # a connection the gateway opened (it must not) would be in the backlog by now
    assert _sentinel_connections(sentinel) == []

    # Control: the same route with a small body does reach the sentinel (which never answers: 504).
    status, headers, body = await raw_http(
        small.listen, b"POST /sentinel HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    )
    _assert_local_reply(status, headers, body, 504, "upstream_timeout")
    contacted = _sentinel_connections(sentinel)
    for conn in contacted:
        conn.close()
    assert len(contacted) == 1


# --------------------------------------------------------------------------------------------------------------------
# WebSocket
# --------------------------------------------------------------------------------------------------------------------


async def test_websocket_echo_subprotocol_and_upstream_close_code(big: Gateway) -> None:
    async with _session() as session, session.ws_connect(f"{big.url}/ws", protocols=("chat",)) as ws:
        assert ws.protocol == "chat"

        await ws.send_str("hello")
        message = await ws.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.TEXT
        assert json.loads(message.data) == {"instance": "a", "echo": "hello"}

        payload = bytes(range(256)) * 300  # 75 KiB: more than one read on every hop
        await ws.send_bytes(payload)
        message = await ws.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.BINARY
        assert message.data == payload

        await ws.send_str("close")  # the upstream closes with 4000 "bye"
        message = await ws.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert (message.data, message.extra) == (4000, "bye")
        assert ws.close_code == 4000


async def test_websocket_101_carries_the_request_id(big: Gateway) -> None:
    status, headers, _ = await raw_http(
        big.listen,
        b"GET /ws HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        + WS_KEY_AND_VERSION
        + b"x-request-id: ws-1\r\n\r\n",
        seconds=5,
    )
    assert status == 101
    assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455's example key and answer
    assert headers["x-request-id"] == "ws-1"


async def test_websocket_client_close_is_answered_with_its_code(big: Gateway) -> None:
    async with _session() as session, session.ws_connect(f"{big.url}/ws") as ws:
        assert ws.protocol is None  # none asked, none negotiated
        await ws.send_str("ping")
        assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.TEXT
        await ws.close(code=4001, message=b"done")
        assert ws.close_code == 4001


async def test_websocket_to_a_down_upstream_is_502_json(big: Gateway) -> None:
    async with _session() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with session.ws_connect(f"{big.url}/down/ws"):
                pass
        assert refused.value.status == 502

        upgrade = {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        }
        async with session.get(f"{big.url}/down/ws", headers=upgrade) as response:
            body = await response.read()
            _assert_local_reply(
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                body,
                502,
                "upstream_unavailable",
            )


@pytest.mark.parametrize(
    "broken",
    [
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",  # no key
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n",
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",  # no version
    ],
    ids=["no-key", "bad-key", "no-version"],
)
async def test_websocket_upgrade_with_a_broken_handshake_is_400(big: Gateway, broken: bytes) -> None:
    status, headers, body = await raw_http(big.listen, b"GET /ws HTTP/1.1\r\nHost: gw\r\n" + broken + b"\r\n")
    _assert_local_reply(status, headers, body, 400, "bad_request")


async def test_upgrade_header_without_connection_upgrade_is_an_ordinary_request(big: Gateway) -> None:
    status, _, body = await raw_http(
        big.listen, b"GET /echo HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n" + WS_KEY_AND_VERSION + b"\r\n"
    )
    assert status == 200, body
    seen = json.loads(body)
    assert seen["path"] == "/echo"
    assert "upgrade" not in seen["headers"]


async def test_websocket_handshake_is_bounded_by_the_route_timeout(small: Gateway, sentinel: socket.socket) -> None:
    for conn in _sentinel_connections(sentinel):
        conn.close()
    started = asyncio.get_running_loop().time()
    status, headers, body = await raw_http(
        small.listen,
        b"GET /sentinel HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        + WS_KEY_AND_VERSION
        + b"\r\n",
        seconds=5,
    )
    elapsed = asyncio.get_running_loop().time() - started
    for conn in _sentinel_connections(sentinel):
        conn.close()
    _assert_local_reply(status, headers, body, 504, "upstream_timeout")
    assert elapsed < 1.0 + SENTINEL_TIMEOUT_MS / 1000
