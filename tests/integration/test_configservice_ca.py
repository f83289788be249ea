"""The mesh CA through the config service app on loopback: who may get a certificate, what it is, that it works for
a real mutual-TLS handshake (serverAuth and clientAuth), the CA bundle's ETag, and tokens reloaded from their file."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from structlog.testing import capture_logs

from gateway.configservice.api import build_app
from gateway.configservice.auth import load_tokens
from gateway.configservice.ca import MeshCA, create_ca
from gateway.configservice.http import ApiState
from gateway.configservice.store_sqlite import SqliteStore
from gateway.configservice.token_reload import TokenReloader, file_identity
from telemetry.metrics import ConfigServiceMetrics
from tests.csr import PrivateKey, ec_key, key_pem, make_csr
from tests.procs import metric_sum

ADMIN = "admin-token-0123456789abcdef"
GATEWAY = "gateway-token-0123456789abcdef"
ORDERS = "orders-token-0123456789abcdef"
PAYMENTS = "payments-token-0123456789abcdef"
OPS_PAYMENTS = "ops-payments-token-0123456789abcdef"
PEM = {"Content-Type": "application/x-pem-file"}
TRUST_DOMAIN = "mesh.test"

TOKENS = {
    "tokens": [
        {"name": "ops", "token": ADMIN, "role": "admin"},
        {"name": "fleet", "token": GATEWAY, "role": "gateway"},
        {"name": "orders-gw", "token": ORDERS, "role": "gateway", "service": "orders"},
        {"name": "payments-gw", "token": PAYMENTS, "role": "gateway", "service": "payments"},
        {"name": "ops-payments", "token": OPS_PAYMENTS, "role": "admin", "service": "payments"},
    ]
}


def auth(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **headers}


@dataclass
class Service:
    client: TestClient[aiohttp.web.Request, aiohttp.web.Application]
    state: ApiState
    ca: MeshCA
    old_ca: MeshCA
    tokens_file: Path
    tmp: Path

    async def issue(self, token: str, key: PrivateKey | None = None) -> tuple[int, dict[str, Any]]:
        body = make_csr(key or ec_key())
        async with self.client.post("/v1/certificates", data=body, headers=auth(token, **PEM)) as response:
            return response.status, await response.json()


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    store = await SqliteStore.open(tmp_path / "data")
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text(yaml.safe_dump(TOKENS))
    now = datetime.datetime.now(datetime.UTC)
    old_cert, old_key = create_ca(TRUST_DOMAIN, now - datetime.timedelta(days=300))
    cert, key = create_ca(TRUST_DOMAIN, now - datetime.timedelta(days=1))
    # Mid-rotation: signing with the new CA, the old one still trusted.
    ca = MeshCA(cert, key, TRUST_DOMAIN, datetime.timedelta(hours=1), also_trusted=(old_cert,))
    old_ca = MeshCA(old_cert, old_key, TRUST_DOMAIN)
    state = ApiState(store, load_tokens(tokens_file), ConfigServiceMetrics())
    client = TestClient(TestServer(build_app(state, ca), host="127.0.0.1"))
    await client.start_server()
    try:
        yield Service(client, state, ca, old_ca, tokens_file, tmp_path)
    finally:
        await client.close()


async def test_ca_bundle_with_etag(service: Service) -> None:
    async with service.client.get("/v1/ca") as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="meshgate"'
    for token in (GATEWAY, ADMIN, ORDERS):
        async with service.client.get("/v1/ca", headers=auth(token)) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/x-pem-file"
            tag = response.headers["ETag"]
            assert tag == f'"{service.ca.bundle_hash}"'
            bundle = await response.read()
    # The rotation bundle: the signing CA first, then the one still trusted.
    assert x509.load_pem_x509_certificates(bundle) == [service.ca.cert, service.old_ca.cert]
    async with service.client.get("/v1/ca", headers=auth(GATEWAY, **{"If-None-Match": tag})) as response:
        assert response.status == 304
        assert response.headers["ETag"] == tag
        assert await response.read() == b""
    async with service.client.get("/v1/ca", headers=auth(GATEWAY, **{"If-None-Match": '"stale"'})) as response:
        assert response.status == 200


async def test_certificates_need_a_token_bound_to_a_service(service: Service) -> None:
    status, answer = await service.issue("not-a-known-token-at-all")
    assert (status, answer["error"]) == (401, "unauthenticated")
    async with service.client.post("/v1/certificates", data=make_csr(ec_key()), headers=PEM) as response:
        assert response.status == 401
    for token, name in ((GATEWAY, "fleet"), (ADMIN, "ops")):
        status, answer = await service.issue(token)
        assert status == 403
        assert answer == {
            "error": "forbidden",
            "message": f"token {name!r} is not bound to a service; a mesh certificate is issued for a token's service",
        }
    metrics = await (await service.client.get("/metrics")).text()
    assert metric_sum(metrics, "meshgate_configservice_certificates_issued_total") == 0


async def test_bad_requests(service: Service) -> None:
    csr = make_csr(ec_key())
    async with service.client.post("/v1/certificates", data=csr, headers=auth(ORDERS)) as response:
        assert response.status == 415  # no Content-Type
        assert (await response.json())["error"] == "unsupported_media_type"
    headers = auth(ORDERS, **{"Content-Type": "application/json"})
    async with service.client.post("/v1/certificates", data=csr, headers=headers) as response:
        assert response.status == 415
    async with service.client.post("/v1/certificates", data=b"x" * (16 * 1024 + 1), headers=auth(ORDERS, **PEM)) as r:
        assert r.status == 413
    async with service.client.post("/v1/certificates", data=b"garbage", headers=auth(ORDERS, **PEM)) as response:
        assert response.status == 400
        assert await response.json() == {
            "error": "invalid_csr",
            "message": "the body is not a PEM certificate signing request",
        }
    headers = auth(ORDERS, **{"Content-Type": "application/pkcs10"})
    async with service.client.post("/v1/certificates", data=csr, headers=headers) as response:
        assert response.status == 201
    async with service.client.get("/v1/certificates", headers=auth(ORDERS)) as response:
        assert response.status == 405


async def test_issue_and_verify(service: Service) -> None:
    key = ec_key()
    csr = make_csr(key, "payments", uris=["spiffe://mesh.test/service/payments"])
    with capture_logs() as logs:
        async with service.client.post("/v1/certificates", data=csr, headers=auth(ORDERS, **PEM)) as response:
            assert response.status == 201
            assert response.content_type == "application/json"
            answer = await response.json()
    assert set(answer) == {"certificate", "ca", "identity", "not_after", "serial"}
    assert answer["identity"] == "spiffe://mesh.test/service/orders"
    cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
    assert cert.public_key() == key.public_key()
    assert answer["ca"].encode() == service.ca.bundle
    assert answer["serial"] == format(cert.serial_number, "x")
    assert 0 < cert.serial_number < 2**128
    assert answer["not_after"] == cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert datetime.timedelta(minutes=59) < cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.UniformResourceIdentifier("spiffe://mesh.test/service/orders")]

    # Verified against what GET /v1/ca serves, by cryptography's own path validation (client certificate profile).
    async with service.client.get("/v1/ca", headers=auth(ORDERS)) as response:
        bundle = await response.read()
    verifier = PolicyBuilder().store(Store(x509.load_pem_x509_certificates(bundle))).build_client_verifier()
    verified = verifier.verify(cert, [])
    assert verified.chain[-1] == service.ca.cert
    assert list(verified.subjects or []) == [x509.UniformResourceIdentifier("spiffe://mesh.test/service/orders")]
    # A certificate from a CA that is not in the bundle does not verify.
    stranger, stranger_key = create_ca(TRUST_DOMAIN, datetime.datetime.now(datetime.UTC))
    foreign = (
        MeshCA(stranger, stranger_key)
        .issue(make_csr(ec_key()), "orders", datetime.datetime.now(datetime.UTC), 7)
        .certificate
    )
    with pytest.raises(VerificationError):
        verifier.verify(foreign, [])

    events = [entry for entry in logs if entry["event"] == "certificate_issued"]
    assert events == [
        {
            "event": "certificate_issued",
            "log_level": "info",
            "service_name": "orders",
            "identity": "spiffe://mesh.test/service/orders",
            "serial": answer["serial"],
            "not_after": answer["not_after"],
            "caller": "orders-gw",
        }
    ]
    # An admin token bound to a service gets one for its service too.
    status, answer = await service.issue(OPS_PAYMENTS)
    assert (status, answer["identity"]) == (201, "spiffe://mesh.test/service/payments")
    metrics = await (await service.client.get("/metrics")).text()
    name = "meshgate_configservice_certificates_issued_total"
    assert metric_sum(metrics, name, service="orders") == 1
    assert metric_sum(metrics, name, service="payments") == 1


async def _write_pair(directory: Path, name: str, key: PrivateKey, answer: dict[str, Any]) -> tuple[Path, Path]:
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert_file.write_text(answer["certificate"])
    key_file.write_bytes(key_pem(key))
    return cert_file, key_file


def _contexts(bundle: str, server: tuple[Path, Path], client: tuple[Path, Path]) -> tuple[ssl.SSLContext, ...]:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(*server)
    server_ctx.load_verify_locations(cadata=bundle)
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # the client's certificate: checked for clientAuth
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False  # a mesh identity is a URI SAN, checked by the caller, not a host name
    client_ctx.load_verify_locations(cadata=bundle)  # the server's certificate: checked for serverAuth
    client_ctx.load_cert_chain(*client)
    for context in (server_ctx, client_ctx):
        context.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default: the certificates must pass it
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    return server_ctx, client_ctx


async def _exchange(port: int, context: ssl.SSLContext) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        writer.write(b"ping\n")
        await writer.drain()
        await reader.readexactly(5)  # TLS 1.3: a refusal of the client's certificate arrives after its Finished
    finally:
        writer.close()


def _uris(peercert: Any) -> list[str]:
    return [value for kind, value in peercert.get("subjectAltName", ()) if kind == "URI"]


async def test_mutual_tls_handshake_with_issued_certificates(service: Service) -> None:
    orders_key, payments_key = ec_key(), ec_key()
    status, orders = await service.issue(ORDERS, orders_key)
    assert status == 201
    status, payments = await service.issue(PAYMENTS, payments_key)
    assert status == 201
    server_pair = await _write_pair(service.tmp, "payments", payments_key, payments)
    client_pair = await _write_pair(service.tmp, "orders", orders_key, orders)
    server_ctx, client_ctx = _contexts(payments["ca"], server_pair, client_pair)

    seen_by_server: list[list[str]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen_by_server.append(_uris(writer.get_extra_info("peercert")))
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        assert _uris(writer.get_extra_info("peercert")) == ["spiffe://mesh.test/service/payments"]
        writer.write(b"ping\n")
        assert await reader.readline() == b"ping\n"
        writer.close()
        await writer.wait_closed()
        assert seen_by_server == [["spiffe://mesh.test/service/orders"]]

        # A client whose certificate another CA signed is refused by the server.
        stranger, stranger_key = create_ca(TRUST_DOMAIN, datetime.datetime.now(datetime.UTC))
        rogue_key = ec_key()
        rogue = MeshCA(stranger, stranger_key).issue(
            make_csr(rogue_key), "orders", datetime.datetime.now(datetime.UTC), 9
        )
        rogue_pair = await _write_pair(service.tmp, "rogue", rogue_key, {"certificate": rogue.pem.decode()})
        _, rogue_ctx = _contexts(payments["ca"], server_pair, rogue_pair)
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await _exchange(port, rogue_ctx)
        assert len(seen_by_server) == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_old_ca_certificates_still_verify_during_rotation(service: Service) -> None:
    now = datetime.datetime.now(datetime.UTC)
    issued_by_old = service.old_ca.issue(make_csr(ec_key()), "orders", now, 11).certificate
    async with service.client.get("/v1/ca", headers=auth(ORDERS)) as response:
        bundle = x509.load_pem_x509_certificates(await response.read())
    verified = PolicyBuilder().store(Store(bundle)).build_client_verifier().verify(issued_by_old, [])
    assert verified.chain[-1] == service.old_ca.cert


async def test_tokens_reloaded_from_the_file(service: Service) -> None:
    reloader = TokenReloader(service.tokens_file, service.state, file_identity(service.tokens_file))
    assert not reloader.check()  # nothing changed
    assert (await service.issue(ORDERS))[0] == 201

    # Revoke orders-gw: the next call with it is unauthenticated.
    remaining = {"tokens": [t for t in TOKENS["tokens"] if t["name"] != "orders-gw"]}
    service.tokens_file.write_text(yaml.safe_dump(remaining))
    with capture_logs() as logs:
        assert reloader.check()
    assert logs[0]["event"] == "tokens_reloaded"
    assert (logs[0]["added"], logs[0]["removed"]) == ([], ["orders-gw"])
    status, answer = await service.issue(ORDERS)
    assert (status, answer["error"]) == (401, "unauthenticated")
    assert (await service.issue(PAYMENTS))[0] == 201

    # A broken file is logged and the previous set kept.
    service.tokens_file.write_text("tokens: [unclosed\n")
    with capture_logs() as logs:
        assert not reloader.check()
    assert logs[0]["event"] == "tokens_reload_failed"
    assert logs[0]["log_level"] == "error"
    assert ADMIN not in str(logs)
    assert (await service.issue(PAYMENTS))[0] == 201
    service.tokens_file.unlink()
    with capture_logs() as logs:
        assert not reloader.check()
    assert "cannot read tokens file" in logs[0]["problems"][0]
    assert (await service.issue(PAYMENTS))[0] == 201

    # A file written by rename (as editors and config management do) is picked up by the polling task.
    replacement = service.tmp / "tokens.new"
    replacement.write_text(yaml.safe_dump(TOKENS))
    replacement.replace(service.tokens_file)
    task = asyncio.create_task(TokenReloader(service.tokens_file, service.state, None, interval=0.05).run())
    try:
        for _ in range(100):
            if (await service.issue(ORDERS))[0] == 201:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the restored token was never reloaded")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_reload_on_request_even_when_the_identity_is_unchanged(service: Service) -> None:
    reloader = TokenReloader(service.tokens_file, service.state, file_identity(service.tokens_file), interval=60)
    task = asyncio.create_task(reloader.run())
    try:
        with capture_logs() as logs:
            reloader.request()  # what SIGHUP does
            for _ in range(100):
                if any(entry["event"] == "tokens_reloaded" for entry in logs):
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("SIGHUP-style request did not reload")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
