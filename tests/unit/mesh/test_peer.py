"""The peer identity: which verified certificates name a mesh identity, and which name none."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Sequence
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.mesh.peer import identity_of, peer_identity
from tests.certs import CA, make_ca

DOMAIN = "meshgate.local"
ORDERS = f"spiffe://{DOMAIN}/service/orders"
BILLING = f"spiffe://{DOMAIN}/service/billing"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return make_ca(tmp_path_factory.mktemp("ca"))


def signed(ca: CA, uris: Sequence[str], *, is_ca: bool | None = False, dns: Sequence[str] = ()) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peer")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(hours=1))
    )
    if is_ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


@pytest.mark.parametrize(
    ("uris", "kwargs", "expected"),
    [
        ((ORDERS,), {}, ORDERS),
        ((ORDERS,), {"dns": ("orders",)}, ORDERS),  # DNS SANs beside it do not matter
        ((ORDERS,), {"is_ca": None}, ORDERS),  # no basicConstraints: not a CA
        ((), {}, ""),
        ((), {"dns": ("orders",)}, ""),
        # Bug fix: the first spiffe:// URI used to win; the X.509-SVID spec allows exactly one URI SAN.
        ((ORDERS, BILLING), {}, ""),
        (("https://orders", ORDERS), {}, ""),
        # Bug fix: any trust domain used to be taken; only the mesh's names a mesh identity.
        (("spiffe://other.domain/service/orders",), {}, ""),
        (("spiffe://meshgate.local.evil/service/orders",), {}, ""),
        # Bug fix: a CA certificate (CA:true) used as a leaf used to give its URI as an identity.
        ((ORDERS,), {"is_ca": True}, ""),
    ],
)
def test_identity_of(ca: CA, uris: Sequence[str], kwargs: dict[str, Any], expected: str) -> None:
    assert identity_of(signed(ca, uris, **kwargs), DOMAIN) == expected


class FakeTls:
    """What ``getpeercert`` answers: the dict (``{}`` when not verified) and the DER either way."""

    def __init__(self, cert: x509.Certificate | None, verified: bool) -> None:
        self._cert = cert
        self._verified = verified

    def getpeercert(self, binary_form: bool = False) -> Any:
        if self._cert is None:
            return None
        if binary_form:
            return self._cert.public_bytes(serialization.Encoding.DER)
        return {"subjectAltName": (("URI", ORDERS),)} if self._verified else {}


def test_peer_identity_needs_a_verified_certificate(ca: CA) -> None:
    cert = signed(ca, (ORDERS,))
    assert peer_identity(None, DOMAIN) == ""  # plain connection
    assert peer_identity(cast(ssl.SSLObject, FakeTls(None, False)), DOMAIN) == ""  # TLS, no client certificate
    assert peer_identity(cast(ssl.SSLObject, FakeTls(cert, False)), DOMAIN) == ""  # presented, not verified
    assert peer_identity(cast(ssl.SSLObject, FakeTls(cert, True)), DOMAIN) == ORDERS
