"""The mesh identity's pure parts: the CSR a gateway sends, and how it judges the config service's answer."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.mesh.identity import IdentityError, build_csr, new_key, parse_answer, uri_sans
from tests.certs import CA, make_ca

ORDERS = "spiffe://meshgate.local/service/orders"
PEM = serialization.Encoding.PEM


def sign(
    ca: CA,
    key: ec.EllipticCurvePrivateKey,
    uris: tuple[str, ...] = (ORDERS,),
    usages: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
    is_ca: bool = False,
) -> x509.Certificate:
    start = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orders")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(0xABC)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(hours=24))
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    )
    if is_ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    if uris:
        names = [x509.UniformResourceIdentifier(uri) for uri in uris]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(ca.key, hashes.SHA256())


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return make_ca(tmp_path_factory.mktemp("ca"))


def answer(ca: CA, cert: x509.Certificate, **extra: Any) -> dict[str, Any]:
    return {
        "certificate": cert.public_bytes(PEM).decode(),
        "ca": ca.cert.public_bytes(PEM).decode(),
        "identity": ORDERS,
        "serial": "abc",
        **extra,
    }


def test_csr_names_the_service_and_asks_for_the_identity() -> None:
    key = new_key()
    csr = x509.load_pem_x509_csr(build_csr(key, "orders", ORDERS))
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "orders"
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [ORDERS]
    assert csr.public_key() == key.public_key()
    assert isinstance(key.curve, ec.SECP256R1)


def test_a_good_answer(ca: CA) -> None:
    key = new_key()
    cert = parse_answer(answer(ca, sign(ca, key)), key, ORDERS)
    assert (cert.identity, cert.serial) == (ORDERS, "ABC")
    assert cert.lifetime == 24 * 3600
    assert cert.not_before == datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC).timestamp()
    assert b"PRIVATE KEY" in cert.key_pem
    assert uri_sans(x509.load_pem_x509_certificate(cert.cert_pem)) == [ORDERS]
    assert cert.ca_pem == ca.cert.public_bytes(PEM)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda ca, key: [], "the answer is not a JSON object"),
        (lambda ca, key: {"certificate": "x"}, 'the answer lacks "certificate" or "ca"'),
        (lambda ca, key: answer(ca, sign(ca, new_key())), "the certificate is not for the key this gateway sent"),
        (
            lambda ca, key: answer(ca, sign(ca, key, uris=("spiffe://meshgate.local/service/billing",))),
            "the certificate names ['spiffe://meshgate.local/service/billing'], not " + ORDERS,
        ),
        (lambda ca, key: answer(ca, sign(ca, key, uris=())), f"the certificate names [], not {ORDERS}"),
        (
            lambda ca, key: answer(ca, sign(ca, key, usages=(ExtendedKeyUsageOID.CLIENT_AUTH,))),
            "the certificate is not valid for both server and client authentication",
        ),
        # Certificates every peer would refuse (gateway/mesh/peer.py) are refused before they are installed.
        (
            lambda ca, key: answer(ca, sign(ca, key, uris=(ORDERS, "spiffe://meshgate.local/service/billing"))),
            "the certificate is a CA certificate or carries more than one URI SAN",
        ),
        (
            lambda ca, key: answer(ca, sign(ca, key, is_ca=True)),
            "the certificate is a CA certificate or carries more than one URI SAN",
        ),
        (
            lambda ca, key: answer(ca, sign(ca, key), identity="spiffe://meshgate.local/service/x"),
            "the service says 'spiffe://meshgate.local/service/x', this gateway is " + ORDERS,
        ),
    ],
)
def test_a_bad_answer_is_refused(ca: CA, mutate: Any, message: str) -> None:
    key = new_key()
    with pytest.raises(IdentityError) as info:
        parse_answer(mutate(ca, key), key, ORDERS)
    assert str(info.value) == message


def test_garbage_pem_is_refused(ca: CA, tmp_path: Path) -> None:
    key = new_key()
    with pytest.raises(IdentityError, match="no valid PEM certificate"):
        parse_answer(
            {"certificate": "-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n", "ca": ""}, key, ORDERS
        )
