"""Mesh mTLS end to end: real gateway processes getting real certificates from a mesh CA, calling each other.

The CA is ``tests/fake_meshca.py`` (the config service's ``/v1/ca`` and ``/v1/certificates``, which the real service
does not have yet), issuing 5-second certificates so that every gateway renews about every 2.5 s during the module.

- ``payments`` (strict) fronts an echo upstream; its policy allows only ``spiffe://meshgate.local/service/orders``.
- ``orders`` and ``billing`` (listener mode disabled: plain HTTP for the test client) call ``payments`` through a
  cluster with ``mesh_identity: spiffe://meshgate.local/service/payments``.
- ``inventory`` (permissive) takes both plain HTTP and mesh mTLS on one port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.certs import make_ca
from tests.fake_meshca import FakeMeshCA, running_meshca
from tests.otlp_receiver import OtlpHttpReceiver
from tests.procs import Gateway, free_port, gateway, log_events, upstream

pytestmark = pytest.mark.e2e

ORDERS = "spiffe://meshgate.local/service/orders"
PAYMENTS = "spiffe://meshgate.local/service/payments"
TTL = 5.0

POLICY = """package meshgate.authz

import rego.v1

default allow := false

allow if input.attributes.source.principal == "spiffe://meshgate.local/service/orders"
"""


@dataclass
class Mesh:
    ca: FakeMeshCA
    receiver: OtlpHttpReceiver  # the spans of payments, orders and billing
    payments: Gateway
    orders: Gateway
    billing: Gateway
    inventory: Gateway


def _bootstrap(directory: Path, service: str, ca: FakeMeshCA, mtls: str, **rest: Any) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    token = f"{service}-token-0123456789abcdef"
    ca.tokens[token] = service
    (directory / "gateway.token").write_text(token)
    return {
        "service": service,
        "config_service": {"url": ca.url, "token_file": "gateway.token", "cache_dir": str(directory / "cache")},
        "mesh": {"mtls": mtls},
        "telemetry": {"logs": {"level": "info"}},
        **rest,
    }


def _caller(directory: Path, service: str, ca: FakeMeshCA, payments: int, inventory: int) -> dict[str, Any]:
    return _bootstrap(
        directory,
        service,
        ca,
        "disabled",
        routes=[
            {"name": "pay", "match": {"path_prefix": "/pay"}, "cluster": "payments"},
            {"name": "wrong", "match": {"path_prefix": "/wrong"}, "cluster": "impostor"},
            {"name": "inv", "match": {"path_prefix": "/inv"}, "cluster": "inventory"},
        ],
        clusters=[
            {"name": "payments", "endpoints": [f"127.0.0.1:{payments}"], "mesh_identity": PAYMENTS},
            # payments' address under another identity: a mis-pointed endpoint must be refused.
            {
                "name": "impostor",
                "endpoints": [f"127.0.0.1:{payments}"],
                "mesh_identity": "spiffe://meshgate.local/service/shipping",
            },
            {
                "name": "inventory",
                "endpoints": [f"127.0.0.1:{inventory}"],
                "mesh_identity": "spiffe://meshgate.local/service/inventory",
            },
        ],
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    base = tmp_path_factory.mktemp("mesh")
    ca = FakeMeshCA(base / "ca", tokens={}, ttl=TTL)
    payments_port, inventory_port = free_port(), free_port()
    bundle = base / "bundle"
    bundle.mkdir()
    (bundle / ".manifest").write_text(json.dumps({"revision": "mesh-1", "roots": ["meshgate"]}))
    (bundle / "authz.rego").write_text(POLICY)
    with contextlib.ExitStack() as stack:
        stack.enter_context(running_meshca(ca))
        receiver = stack.enter_context(OtlpHttpReceiver())
        app = stack.enter_context(upstream("app"))
        payments = _bootstrap(
            base / "payments",
            "payments",
            ca,
            "strict",
            listen=f"127.0.0.1:{payments_port}",
            routes=[{"name": "pay", "match": {"path_prefix": "/pay"}, "cluster": "app"}],
            clusters=[{"name": "app", "endpoints": [f"127.0.0.1:{app}"]}],
            authz={"engine": "embedded", "bundle": str(bundle)},
        )
        payments["telemetry"] = {"tracing": {"otlp_endpoint": receiver.endpoint, "batch": {"delay": "100ms"}}}
        inventory = _bootstrap(
            base / "inventory",
            "inventory",
            ca,
            "permissive",
            listen=f"127.0.0.1:{inventory_port}",
            routes=[{"name": "inv", "match": {"path_prefix": "/inv"}, "cluster": "app"}],
            clusters=[{"name": "app", "endpoints": [f"127.0.0.1:{app}"]}],
        )
        gateways = {
            "payments": stack.enter_context(gateway(base / "payments", payments)),
            "inventory": stack.enter_context(gateway(base / "inventory", inventory)),
        }
        for name in ("orders", "billing"):
            config = _caller(base / name, name, ca, payments_port, inventory_port)
            # Sampled at the caller: payments follows its caller's sampling decision.
            config["telemetry"] = {"tracing": {"otlp_endpoint": receiver.endpoint, "batch": {"delay": "100ms"}}}
            gateways[name] = stack.enter_context(gateway(base / name, config))
        yield Mesh(ca, receiver, **gateways)


async def _get(url: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(url, **kwargs) as response:
        body = await response.read()
        return response.status, (json.loads(body) if body.startswith(b"{") else {})


def _mesh_trust(ca: FakeMeshCA) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # mesh certificates name a SPIFFE URI, not a host
    context.load_verify_locations(cadata=ca.bundle.decode())
    return context


def _access(gw: Gateway, route: str, path: str | None = None, within: float = 5.0) -> list[dict[str, Any]]:
    """The access lines of ``route`` (and ``path``), waiting for at least one."""
    deadline = time.monotonic() + within
    while True:  # access lines are flushed every 0.5 s
        lines = [
            line
            for line in log_events(gw, "request")
            if line.get("route") == route and (path is None or line.get("path") == path)
        ]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


async def test_orders_calls_payments_over_mesh_mtls(mesh: Mesh) -> None:
    status, echo = await _get(f"{mesh.orders.url}/pay/1")
    assert (status, echo["instance"]) == (200, "app")
    assert echo["headers"]["x-forwarded-proto"] == "https"  # payments took the call over TLS
    line = _access(mesh.payments, "pay", "/pay/1")[-1]
    assert line["peer_identity"] == ORDERS
    assert line["status"] == 200
    [span] = mesh.receiver.wait_for(
        lambda s: (
            s.kind == "SERVER" and s.attributes.get("url.path") == "/pay/1" and s.attributes["url.scheme"] == "https"
        )
    )
    assert span.attributes["meshgate.peer.identity"] == ORDERS


async def test_identity_policy_denies_another_caller(mesh: Mesh) -> None:
    status, body = await _get(f"{mesh.billing.url}/pay/denied")
    assert status == 403
    assert body["error"] == "forbidden"  # payments' policy; billing relays its reply
    line = _access(mesh.payments, "pay", "/pay/denied")[-1]
    assert (line["status"], line["peer_identity"]) == (403, "spiffe://meshgate.local/service/billing")


async def test_strict_refuses_plain_http(mesh: Mesh) -> None:
    with pytest.raises(aiohttp.ClientError):
        await _get(f"http://127.0.0.1:{mesh.payments.listen}/pay/1")


async def test_strict_refuses_a_client_without_certificate(mesh: Mesh) -> None:
    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
        await _get(f"https://127.0.0.1:{mesh.payments.listen}/pay/1", ssl=_mesh_trust(mesh.ca))


async def test_strict_refuses_a_certificate_from_another_ca(mesh: Mesh, tmp_path: Path) -> None:
    other = make_ca(tmp_path / "other", "other-ca")
    forged = other.issue("orders", uris=(ORDERS,))
    context = _mesh_trust(mesh.ca)
    context.load_cert_chain(forged.cert_file, forged.key_file)
    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
        await _get(f"https://127.0.0.1:{mesh.payments.listen}/pay/1", ssl=context)


async def test_a_peer_with_another_identity_is_refused(mesh: Mesh) -> None:
    status, body = await _get(f"{mesh.orders.url}/wrong/1")
    assert (status in (502, 503), body["error"]) == (True, "upstream_unavailable")
    deadline = time.monotonic() + 5
    while not (events := log_events(mesh.orders, "upstream_identity_mismatch")) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)  # log lines are flushed in batches, to a file
    assert events[-1]["expected"] == "spiffe://meshgate.local/service/shipping"
    assert events[-1]["presented"] == [PAYMENTS]


async def test_permissive_takes_plain_http_and_mesh_mtls(mesh: Mesh) -> None:
    status, echo = await _get(f"{mesh.inventory.url}/inv/plain")
    assert (status, echo["headers"]["x-forwarded-proto"]) == (200, "http")
    # TLS without a client certificate: accepted, no identity.
    status, echo = await _get(f"https://127.0.0.1:{mesh.inventory.listen}/inv/tls", ssl=_mesh_trust(mesh.ca))
    assert (status, echo["headers"]["x-forwarded-proto"]) == (200, "https")
    status, echo = await _get(f"{mesh.orders.url}/inv/mesh")
    assert (status, echo["headers"]["x-forwarded-proto"]) == (200, "https")
    identities = {
        path: _access(mesh.inventory, "inv", path)[-1]["peer_identity"]
        for path in ("/inv/plain", "/inv/tls", "/inv/mesh")
    }
    assert identities == {"/inv/plain": None, "/inv/tls": None, "/inv/mesh": ORDERS}


async def test_certificates_renew_under_load_without_failed_requests(mesh: Mesh) -> None:
    def issued_to(identity: str) -> int:
        return sum(1 for name, _ in list(mesh.ca.issued) if name == identity)

    before = issued_to(ORDERS), issued_to(PAYMENTS)
    results: list[int] = []
    stop_at = time.monotonic() + 3 * TTL / 2 + 1  # at least two renewals of each side

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop_at:
            try:
                async with session.get(f"{mesh.orders.url}/pay/load") as response:
                    await response.read()
                    results.append(response.status)
            except aiohttp.ClientError:
                results.append(0)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(8)))
    after = issued_to(ORDERS), issued_to(PAYMENTS)
    assert after[0] - before[0] >= 2, (before, after)
    assert after[1] - before[1] >= 2, (before, after)
    assert len(results) > 100
    assert set(results) == {200}, {status: results.count(status) for status in set(results)}
    installed = log_events(mesh.payments, "mesh_certificate_installed")
    assert len(installed) >= 3
