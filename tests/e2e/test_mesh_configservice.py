"""e2e: mesh mTLS with the real config service as the CA, and configs pushed through it.

``payments`` (strict mTLS) allows only callers whose verified identity is orders'; ``orders`` and ``billing`` call it
through a cluster with ``mesh_identity``. Every gateway gets its certificate from ``POST /v1/certificates`` with its
own service-bound token; removing a token from the service's tokens file revokes it: no new certificate.
(``test_mesh.py`` covers renewal under load with 5-second certificates, below this service's 5-minute minimum.)
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from policy.bundle import build_tarball
from tests.configservice_proc import ConfigService, config_service
from tests.csr import make_csr
from tests.procs import Gateway, eventually, free_port, gateway, upstream

pytestmark = pytest.mark.e2e

PAYMENTS = "spiffe://meshgate.local/service/payments"
TOKENS = {service: f"{service}-gateway-token-0123456789" for service in ("orders", "payments", "billing")}
POLICY = """package meshgate.authz

import rego.v1

default allow := false

allow if input.attributes.source.principal == "spiffe://meshgate.local/service/orders"
"""


@dataclass
class Mesh:
    service: ConfigService
    payments: Gateway
    orders: Gateway
    billing: Gateway
    payments_port: int


def bootstrap(tmp: Path, service: ConfigService, name: str, mtls: str, **rest: Any) -> dict[str, Any]:
    directory = tmp / f"g-{name}"
    directory.mkdir()
    (directory / "gateway.token").write_text(TOKENS[name])
    return {
        "service": name,
        "config_service": {"url": service.url, "token_file": str(directory / "gateway.token"), "gateway_id": name},
        "mesh": {"mtls": mtls},
        **rest,
    }


def caller(payments_port: int) -> dict[str, Any]:
    return {
        "routes": [{"name": "pay", "match": {"path_prefix": "/pay"}, "cluster": "payments"}],
        "clusters": [{"name": "payments", "endpoints": [f"127.0.0.1:{payments_port}"], "mesh_identity": PAYMENTS}],
    }


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("mesh-cs")
    tokens = [{"name": f"{s}-gw", "token": t, "role": "gateway", "service": s} for s, t in TOKENS.items()]
    payments_port = free_port()
    with ExitStack() as stack:
        service = stack.enter_context(config_service(tmp / "cs", tokens=tokens))
        app = stack.enter_context(upstream("app"))
        policy = tmp / "policy"
        policy.mkdir()
        (policy / ".manifest").write_text(json.dumps({"revision": "mesh-1", "roots": ["meshgate"]}))
        (policy / "authz.rego").write_text(POLICY)
        build_tarball(policy, tmp / "policy.tar.gz")
        assert service.call("PUT", "/v1/bundles/mesh", raw=(tmp / "policy.tar.gz").read_bytes())[0] == 201
        service.push(
            "payments",
            {
                "routes": [{"name": "pay", "match": {"path_prefix": "/pay"}, "cluster": "app"}],
                "clusters": [{"name": "app", "endpoints": [f"127.0.0.1:{app}"]}],
                "authz": {"bundle": "mesh"},
            },
        )
        service.push("orders", caller(payments_port))
        service.push("billing", caller(payments_port))
        strict = bootstrap(tmp, service, "payments", "strict", listen=f"127.0.0.1:{payments_port}")
        payments = stack.enter_context(gateway(tmp / "g-payments", strict))
        orders = stack.enter_context(gateway(tmp / "g-orders", bootstrap(tmp, service, "orders", "disabled")))
        billing = stack.enter_context(gateway(tmp / "g-billing", bootstrap(tmp, service, "billing", "disabled")))
        yield Mesh(service, payments, orders, billing, payments_port)


async def test_orders_is_allowed_by_identity_and_billing_is_not(mesh: Mesh) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{mesh.orders.url}/pay/1") as response:
            assert response.status == 200
        async with session.get(f"{mesh.billing.url}/pay/1") as response:
            assert response.status == 403  # verified as billing: the identity rule denies it


async def test_strict_payments_refuses_plain_http_and_a_foreign_certificate(mesh: Mesh, tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{mesh.payments_port}/pay/1") as response:
                await response.read()
        # TLS, but no client certificate: the handshake is refused.
        no_cert = ssl.create_default_context()
        no_cert.check_hostname = False
        no_cert.verify_mode = ssl.CERT_NONE
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"https://127.0.0.1:{mesh.payments_port}/pay/1", ssl=no_cert) as response:
                await response.read()


async def test_a_removed_token_can_no_longer_obtain_certificates(mesh: Mesh) -> None:
    csr = make_csr(ec.generate_private_key(ec.SECP256R1()))
    pem = "application/x-pem-file"
    status, answer = mesh.service.call("POST", "/v1/certificates", raw=csr, token=TOKENS["billing"], content_type=pem)
    assert status == 201
    assert answer["identity"] == "spiffe://meshgate.local/service/billing"
    document = yaml.safe_load(mesh.service.tokens_file.read_text())
    document["tokens"] = [t for t in document["tokens"] if t.get("service") != "billing"]
    mesh.service.tokens_file.write_text(yaml.safe_dump(document))

    async def refused() -> bool:
        answer = mesh.service.call("POST", "/v1/certificates", raw=csr, token=TOKENS["billing"], content_type=pem)
        return answer[0] == 401

    await eventually(refused, 5.0, "the revoked token refused")
