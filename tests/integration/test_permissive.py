"""The permissive listener (``mesh/permissive.py``) on loopback, on both event loops the gateway runs on: plain HTTP
and TLS on one port, a verified client certificate seen by the handler, and a silent connection closed.

The TLS branch builds the loop's own ``SSLProtocol`` (a private class of asyncio and of uvloop): this test is what
catches a uvloop release that changes it."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import uvloop
from aiohttp import web

from gateway.mesh import permissive
from gateway.mesh.peer import peer_identity
from gateway.mesh.permissive import SniffingSite
from tests.certs import make_ca

ORDERS = "spiffe://meshgate.local/service/orders"
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


async def _scenario(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    server_cert = ca.issue("server", uris=("spiffe://meshgate.local/service/payments",))
    client_cert = ca.issue("client", uris=(ORDERS,))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_cert.cert_file, server_cert.key_file)
    context.load_verify_locations(ca.cert_file)
    context.verify_mode = ssl.CERT_OPTIONAL

    async def handler(request: web.BaseRequest) -> web.Response:
        tls = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
        scheme = "https" if tls is not None else "http"
        return web.Response(text=f"{scheme} {peer_identity(tls, 'meshgate.local') or '-'}")

    runner = web.ServerRunner(web.Server(handler))
    await runner.setup()
    site = SniffingSite(runner, "127.0.0.1", 0, context=context)
    await site.start()
    assert site._server is not None
    port = site._server.sockets[0].getsockname()[1]
    client_ctx = ssl.create_default_context(cafile=str(ca.cert_file))
    client_ctx.check_hostname = False
    anonymous_ctx = ssl.create_default_context(cafile=str(ca.cert_file))
    anonymous_ctx.check_hostname = False
    client_ctx.load_cert_chain(client_cert.cert_file, client_cert.key_file)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/") as response:
                assert await response.text() == "http -"
            async with session.get(f"https://127.0.0.1:{port}/", ssl=client_ctx) as response:
                assert await response.text() == f"https {ORDERS}"
            async with session.get(f"https://127.0.0.1:{port}/", ssl=anonymous_ctx) as response:
                assert await response.text() == "https -"
        # A connection that sends nothing is closed by the sniffer (slowloris on the first byte).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_plain_and_tls_on_one_port(loop_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(permissive, "SNIFF_TIMEOUT", 0.3)
    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(_scenario(tmp_path))
