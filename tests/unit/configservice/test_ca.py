"""The mesh CA: CA material, issuing from a CSR (extensions exactly), refused CSRs, the rotation bundle."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from gateway.configservice.ca import (
    CaError,
    CsrError,
    MeshCA,
    check_trust_domain,
    create_ca,
    load_or_create,
    load_pair,
    load_trusted,
    parse_ttl,
)
from tests.certs import make_ca
from tests.csr import ec_key, key_pem, make_csr

NOW = datetime.datetime(2026, 5, 1, 12, 0, tzinfo=datetime.UTC)
SERIAL = 0xC0FFEE_0123456789ABCDEF_01234567


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    cert, key = create_ca("example.org", NOW - datetime.timedelta(days=1))
    return MeshCA(cert, key, "example.org", datetime.timedelta(hours=24))


def usage(cert: x509.Certificate) -> x509.KeyUsage:
    return cert.extensions.get_extension_for_class(x509.KeyUsage).value


def test_create_ca() -> None:
    cert, key = create_ca("mesh.example", NOW)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "meshgate mesh CA mesh.example"
    assert isinstance(key.curve, ec.SECP256R1)
    assert cert.not_valid_before_utc == NOW - datetime.timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + datetime.timedelta(days=3650)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert (constraints.value.ca, constraints.value.path_length) == (True, 0)
    key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert key_usage.critical
    assert (key_usage.value.key_cert_sign, key_usage.value.crl_sign, key_usage.value.digital_signature) == (
        True,
        True,
        False,
    )
    cert.verify_directly_issued_by(cert)


def test_issue_extensions_exactly(ca: MeshCA) -> None:
    key = ec_key()
    issued = ca.issue(make_csr(key), "orders", NOW, SERIAL)
    cert = issued.certificate
    assert issued.identity == "spiffe://example.org/service/orders"
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orders")])
    assert cert.issuer == ca.cert.subject
    assert cert.serial_number == SERIAL
    assert issued.serial_hex == "c0ffee0123456789abcdef01234567"
    assert cert.not_valid_before_utc == NOW - datetime.timedelta(minutes=5)
    assert cert.not_valid_after_utc == issued.not_after == NOW + datetime.timedelta(hours=24)
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(ca.cert)
    assert x509.load_pem_x509_certificate(issued.pem) == cert

    extensions = {ext.oid: ext for ext in cert.extensions}
    assert set(extensions) == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
    constraints = extensions[ExtensionOID.BASIC_CONSTRAINTS]
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=False, path_length=None)
    assert extensions[ExtensionOID.KEY_USAGE].critical
    key_usage = usage(cert)
    assert key_usage.digital_signature
    assert not any(
        [
            key_usage.key_encipherment,
            key_usage.content_commitment,
            key_usage.data_encipherment,
            key_usage.key_agreement,
            key_usage.key_cert_sign,
            key_usage.crl_sign,
        ]
    )
    assert list(extensions[ExtensionOID.EXTENDED_KEY_USAGE].value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    sans = extensions[ExtensionOID.SUBJECT_ALTERNATIVE_NAME].value
    assert list(sans) == [x509.UniformResourceIdentifier("spiffe://example.org/service/orders")]
    assert extensions[ExtensionOID.SUBJECT_KEY_IDENTIFIER].value == x509.SubjectKeyIdentifier.from_public_key(
        key.public_key()
    )
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert extensions[ExtensionOID.AUTHORITY_KEY_IDENTIFIER].value.key_identifier == ca_ski.digest


def test_csr_subject_and_sans_are_ignored(ca: MeshCA) -> None:
    csr = make_csr(
        ec_key(),
        "payments",
        dns=["payments.internal", "localhost"],
        uris=["spiffe://example.org/service/payments", "spiffe://evil.org/service/admin"],
    )
    cert = ca.issue(csr, "orders", NOW, SERIAL).certificate
    assert cert.subject.rfc4514_string() == "CN=orders"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.UniformResourceIdentifier("spiffe://example.org/service/orders")]


def test_rsa_key_gets_key_encipherment(ca: MeshCA) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = ca.issue(make_csr(key), "orders", NOW, SERIAL).certificate
    assert usage(cert).digital_signature
    assert usage(cert).key_encipherment


def test_p384_csr_and_der_csr_accepted(ca: MeshCA) -> None:
    key = ec_key(ec.SECP384R1())
    pem = make_csr(key)
    der = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
    assert ca.issue(der, "orders", NOW, SERIAL).certificate.public_key() == key.public_key()


def test_p384_ca_signs_with_sha384() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p384 CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA384())
    )
    issued = MeshCA(cert, key).issue(make_csr(ec_key()), "orders", NOW, SERIAL).certificate
    assert isinstance(issued.signature_hash_algorithm, hashes.SHA384)
    # No SKI on this CA: the AKI is computed from its public key.
    aki = issued.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki == x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
    issued.verify_directly_issued_by(cert)


def test_validity_never_outlives_the_ca() -> None:
    cert, key = create_ca("example.org", NOW - datetime.timedelta(days=3650) + datetime.timedelta(hours=2))
    issued = MeshCA(cert, key).issue(make_csr(ec_key()), "orders", NOW, SERIAL)
    assert issued.not_after == cert.not_valid_after_utc < NOW + datetime.timedelta(hours=24)


def _tampered_csr() -> bytes:
    der = bytearray(x509.load_pem_x509_csr(make_csr(ec_key(), "orders")).public_bytes(serialization.Encoding.DER))
    at = der.index(b"orders")
    der[at : at + 6] = b"orderz"  # the signed content changes; the signature stays
    return bytes(der)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(lambda: b"not a csr", "the body is not a PEM certificate signing request", id="garbage"),
        pytest.param(
            lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "the body is not a PEM certificate signing request",
            id="bad-pem",
        ),
        pytest.param(
            lambda: make_ca_cert_pem(), "the body is not a PEM certificate signing request", id="a-certificate"
        ),
        pytest.param(_tampered_csr, "the certificate signing request's signature does not verify", id="tampered"),
        pytest.param(
            lambda: make_csr(ec_key(ec.SECP521R1())),
            "unsupported curve secp521r1 (use EC P-256/P-384 or RSA >= 2048)",
            id="p521",
        ),
        pytest.param(
            lambda: make_csr(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
            "RSA key of 1024 bits is too small (use EC P-256/P-384 or RSA >= 2048)",
            id="rsa-1024",
        ),
        pytest.param(lambda: _ed25519_csr(), "Ed25519PublicKey", id="ed25519"),
    ],
)
def test_bad_csr_rejected(ca: MeshCA, body: object, message: str) -> None:
    assert callable(body)
    with pytest.raises(CsrError) as caught:
        ca.issue(body(), "orders", NOW, SERIAL)
    assert message in str(caught.value)


def make_ca_cert_pem() -> bytes:
    cert, _ = create_ca("example.org", NOW)
    return cert.public_bytes(serialization.Encoding.PEM)


def _ed25519_csr() -> bytes:
    key = ed25519.Ed25519PrivateKey.generate()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    )
    return builder.sign(key, None).public_bytes(serialization.Encoding.PEM)


def test_rotation_bundle_order(ca: MeshCA) -> None:
    old_cert, _ = create_ca("example.org", NOW - datetime.timedelta(days=400))
    other_cert, _ = create_ca("example.org", NOW - datetime.timedelta(days=800))
    rotated = MeshCA(ca.cert, ca.key, "example.org", also_trusted=(old_cert, ca.cert, other_cert, old_cert))
    assert rotated.trusted == (ca.cert, old_cert, other_cert)  # signer first, each once, then in the given order
    assert x509.load_pem_x509_certificates(rotated.bundle) == [ca.cert, old_cert, other_cert]
    assert ca.bundle == ca.cert.public_bytes(serialization.Encoding.PEM)
    assert rotated.bundle_hash != ca.bundle_hash
    assert len(rotated.bundle_hash) == 64


def test_load_or_create(tmp_path: Path) -> None:
    directory = tmp_path / "data" / "ca"
    cert, key, created = load_or_create(directory, "example.org", NOW)
    assert created
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    assert sorted(p.name for p in directory.iterdir()) == ["ca.key", "ca.pem"]
    again, again_key, created = load_or_create(directory, "other.org", NOW)
    assert not created
    assert again == cert
    assert key_pem(again_key) == key_pem(key)
    (directory / "ca.pem").unlink()
    with pytest.raises(CaError, match=r"ca\.pem is missing \(restore it, or remove .* to create a new CA\)"):
        load_or_create(directory, "example.org", NOW)


def test_load_pair_checks(tmp_path: Path) -> None:
    test_ca = make_ca(tmp_path, "files-ca")
    key_file = tmp_path / "files-ca.key"
    key_file.write_bytes(key_pem(test_ca.key))
    cert, _ = load_pair(test_ca.cert_file, key_file, NOW)
    assert cert == test_ca.cert

    wrong = tmp_path / "wrong.key"
    wrong.write_bytes(key_pem(ec_key()))
    with pytest.raises(CaError, match="the key does not belong to the certificate"):
        load_pair(test_ca.cert_file, wrong, NOW)

    leaf = test_ca.issue("leaf")
    with pytest.raises(CaError, match=r"CN=leaf is not a CA certificate \(basicConstraints CA:true\)"):
        load_pair(leaf.cert_file, leaf.key_file, NOW)
    with pytest.raises(CaError, match="is not a CA certificate"):
        load_trusted([test_ca.cert_file, leaf.cert_file])

    with pytest.raises(CaError, match="the CA certificate expired at"):
        load_pair(test_ca.cert_file, key_file, NOW + datetime.timedelta(days=3650))
    with pytest.raises(CaError, match="No such file or directory"):
        load_pair(tmp_path / "missing.pem", key_file, NOW)
    with pytest.raises(CaError, match="no PEM certificate in the file"):
        load_pair(key_file, key_file, NOW)
    with pytest.raises(CaError, match="not an unencrypted PEM private key"):
        load_pair(test_ca.cert_file, test_ca.cert_file, NOW)


def test_load_trusted_reads_bundles(tmp_path: Path) -> None:
    first, second = make_ca(tmp_path, "one"), make_ca(tmp_path, "two")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(first.cert_file.read_bytes() + second.cert_file.read_bytes())
    assert load_trusted([bundle, first.cert_file]) == (first.cert, second.cert, first.cert)


@pytest.mark.parametrize("domain", ["meshgate.local", "example.org", "a", "prod-1.mesh.example.com", "x" * 63])
def test_trust_domain_valid(domain: str) -> None:
    assert check_trust_domain(domain) == domain


@pytest.mark.parametrize(
    "domain", ["", "Example.org", "-a.org", "a-.org", "a..org", ".a", "a.", "a_b.org", "a/b", "x" * 64, "a:80"]
)
def test_trust_domain_invalid(domain: str) -> None:
    with pytest.raises(ValueError, match="invalid trust domain"):
        check_trust_domain(domain)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300), ("24h", 86400), ("90m", 5400), ("7d", 7 * 86400), ("30d", 30 * 86400), ("720h", 30 * 86400)],
)
def test_parse_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text).total_seconds() == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4m", "certificate TTL '4m' is out of range (5m..30d)"),
        ("31d", "certificate TTL '31d' is out of range (5m..30d)"),
        ("0d", "out of range"),
        ("1.5d", "invalid duration"),
        ("forever", "invalid duration"),
    ],
)
def test_parse_ttl_invalid(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_ttl(text)
