"""The mesh runtime on loopback, against the fake mesh CA: a strict listener and a mesh client (the connector a
``mesh_identity`` cluster uses) in one process. A renewal mid-request fails nothing, and new handshakes get the new
certificate; a CA added beside the old one is trusted after the next bundle poll, without dropping connections; a
peer with another identity is refused."""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509

from gateway.config.snapshot import MeshSettings
from gateway.mesh.connector import MeshConnector, MeshIdentityMismatch
from gateway.mesh.peer import peer_identity
from gateway.mesh.runtime import Mesh
from tests.fake_meshca import FakeMeshCA, running_meshca

ORDERS = "spiffe://meshgate.local/service/orders"
PAYMENTS = "spiffe://meshgate.local/service/payments"


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeMeshCA]:
    ca = FakeMeshCA(tmp_path / "ca", tokens={"orders-t": "orders", "payments-t": "payments"})
    with running_meshca(ca):
        yield ca


@dataclass
class Pair:
    payments: Mesh
    orders: Mesh
    url: str


@pytest.fixture
async def pair(fake: FakeMeshCA) -> AsyncIterator[Pair]:
    payments = Mesh(
        MeshSettings("strict"), "payments", fake.url, lambda: "payments-t", random.Random(1), trust_interval=0.1
    )
    orders = Mesh(
        MeshSettings("disabled"), "orders", fake.url, lambda: "orders-t", random.Random(2), trust_interval=0.1
    )
    for mesh in (payments, orders):
        mesh.start()
        assert await mesh.wait_ready(5)
    assert payments.listener is not None
    assert orders.listener is None

    async def handler(request: web.BaseRequest) -> web.Response:
        if request.path == "/slow":
            await asyncio.sleep(0.5)
        tls = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
        return web.Response(text=peer_identity(tls, "meshgate.local"))

    runner = web.ServerRunner(web.Server(handler))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=payments.listener.context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Pair(payments, orders, f"https://127.0.0.1:{port}")
    finally:
        await runner.cleanup()
        await payments.stop()
        await orders.stop()


def session(mesh: Mesh, expected: str = PAYMENTS) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=MeshConnector(mesh, expected))


async def served_serial(pair: Pair) -> int:
    """The serial a new handshake with the listener gets."""
    _, writer = await asyncio.open_connection(
        pair.url.split(":")[1][2:], int(pair.url.rsplit(":", 1)[1]), ssl=pair.orders.client_context()
    )
    try:
        return x509.load_der_x509_certificate(
            writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        ).serial_number
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def test_the_listener_sees_the_callers_identity(pair: Pair) -> None:
    async with session(pair.orders) as client, client.get(f"{pair.url}/who") as response:
        assert (response.status, await response.text()) == (200, ORDERS)


async def test_another_identity_is_refused_after_the_handshake(pair: Pair) -> None:
    async with session(pair.orders, "spiffe://meshgate.local/service/shipping") as client:
        with pytest.raises(MeshIdentityMismatch) as info:
            await client.get(f"{pair.url}/who")
    assert (info.value.expected, info.value.presented) == ("spiffe://meshgate.local/service/shipping", [PAYMENTS])


async def test_renewal_mid_request_fails_nothing_and_new_handshakes_get_the_new_certificate(pair: Pair) -> None:
    old = pair.payments.certificate
    assert old is not None
    async with session(pair.orders) as client:
        slow = asyncio.ensure_future(client.get(f"{pair.url}/slow"))
        await asyncio.sleep(0.1)
        pair.payments.install(await pair.payments.obtain())  # both sides renew while the request is in flight
        pair.orders.install(await pair.orders.obtain())
        response = await slow
        assert (response.status, await response.text()) == (200, ORDERS)
        response.release()
        new = pair.payments.certificate
        assert new is not None
        assert new.serial != old.serial
        assert format(await served_serial(pair), "X") == new.serial
        async with client.get(f"{pair.url}/who") as again:  # the pooled connection, made before the renewal
            assert again.status == 200


async def test_a_new_ca_is_trusted_after_the_bundle_poll_without_dropping_connections(
    pair: Pair, fake: FakeMeshCA
) -> None:
    async with session(pair.orders) as client:
        async with client.get(f"{pair.url}/who") as response:
            assert response.status == 200  # a keep-alive connection under the old CA
        fake.rotate()  # a new CA beside the old one, signing from now on
        for _ in range(50):  # both poll every 0.1 s
            if all(
                m.trust.bundle is not None and m.trust.bundle.count(b"BEGIN CERTIFICATE") == 2
                for m in (pair.orders, pair.payments)
            ):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the new bundle was not picked up")
        pair.orders.install(await pair.orders.obtain())  # orders now proves itself with a certificate of the new CA
        async with client.get(f"{pair.url}/who") as response:  # the old connection still serves
            assert response.status == 200
        async with session(pair.orders) as fresh, fresh.get(f"{pair.url}/who") as response:  # a new handshake
            assert (response.status, await response.text()) == (200, ORDERS)


async def test_a_certificate_with_the_identity_among_others_is_refused(pair: Pair, fake: FakeMeshCA) -> None:
    # Bug fix: the connector took any certificate whose URI SANs *included* the expected identity; one signed by a
    # mesh CA that names two services proves neither.
    both = fake.cas[-1].issue("both", uris=(PAYMENTS, ORDERS), directory=fake.directory / "both")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(both.cert_file, both.key_file)
    runner = web.ServerRunner(web.Server(lambda request: web.Response(text="served")))  # type: ignore[arg-type,return-value]
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with session(pair.orders) as client:
            with pytest.raises(MeshIdentityMismatch) as info:
                await client.get(f"https://127.0.0.1:{port}/who")
        assert info.value.presented == [PAYMENTS, ORDERS]
    finally:
        await runner.cleanup()


async def test_a_plain_http_url_is_never_sent_in_clear(pair: Pair) -> None:
    # Bug fix: the connector returned plain connections unchecked; a mesh cluster is called over TLS or not at all.
    async with session(pair.orders) as client:
        with pytest.raises(aiohttp.ClientSSLError):
            await client.get(pair.url.replace("https://", "http://") + "/who")
