"""The mesh certificate authority: CA material (created, loaded, trusted for rotation) and issuing from a CSR.

A gateway proves who it is with its gateway token and sends a CSR (its key never leaves it); the CA signs a
short-lived certificate whose only identity is the URI SAN ``spiffe://<trust-domain>/service/<service>``, the
service coming from the *token*. The CSR contributes its public key and nothing else: its subject and SANs are
ignored, so a caller cannot ask for a name it was not given.

Everything here but ``load_or_create`` (files) is pure: ``now`` and the serial are passed in (the signature of an
ECDSA key is randomized by the library, which is the one exception).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.config.compile import SERVICE_NAME
from gateway.config.mesh import TRUST_DOMAIN
from gateway.config.values import parse_duration

__all__ = [
    "CA_DIR",
    "DEFAULT_TRUST_DOMAIN",
    "DEFAULT_TTL",
    "MAX_TTL",
    "MIN_TTL",
    "CaError",
    "CsrError",
    "IssuedCertificate",
    "MeshCA",
    "SigningKey",
    "check_trust_domain",
    "create_ca",
    "load_or_create",
    "load_pair",
    "load_trusted",
    "new_serial",
    "parse_ttl",
]

CA_DIR: Final = "ca"  # under the data directory: ca.pem, ca.key
DEFAULT_TRUST_DOMAIN: Final = "meshgate.local"
DEFAULT_TTL: Final = datetime.timedelta(hours=24)
MIN_TTL: Final = datetime.timedelta(minutes=5)
MAX_TTL: Final = datetime.timedelta(days=30)
CA_VALIDITY: Final = datetime.timedelta(days=3650)
# A gateway's clock may be a little behind the service's: a certificate is valid from a few minutes ago.
BACKDATE: Final = datetime.timedelta(minutes=5)

# The same rule as the gateway config's `mesh.trust_domain` (DNS-like), at most 253 characters.
_TRUST_DOMAIN: Final = TRUST_DOMAIN
_SERVICE: Final = SERVICE_NAME  # services are named as in the gateway config
_CURVES: Final = ("secp256r1", "secp384r1")
_MIN_RSA_BITS: Final = 2048

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CaError(Exception):
    """CA material that cannot be used (a file unreadable, not a CA, a key that does not match); one line."""


class CsrError(ValueError):
    """A certificate request that is refused (not a CSR, a bad self-signature, a weak or unsupported key)."""


def check_trust_domain(text: str) -> str:
    """``text`` if it is a valid trust domain, else ``ValueError`` with a user-facing message."""
    if len(text) > 253 or not _TRUST_DOMAIN.fullmatch(text):
        raise ValueError(
            f"invalid trust domain {text[:60]!r} (a DNS-like name: lower-case letters, digits, '-', dot-separated)"
        )
    return text


def parse_ttl(text: str) -> datetime.timedelta:
    """``--cert-ttl``: a duration (``90m``, ``24h``, ``7d``) between ``MIN_TTL`` and ``MAX_TTL``."""
    if text.endswith("d") and text[:-1].isdigit():
        ttl = datetime.timedelta(days=int(text[:-1]))
    else:
        ttl = datetime.timedelta(seconds=parse_duration(text))
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise ValueError(f"certificate TTL {text!r} is out of range (5m..30d)")
    return ttl


def new_serial() -> int:
    """A random positive 128-bit serial number."""
    return secrets.randbits(128) or 1


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    certificate: x509.Certificate
    identity: str  # the URI SAN
    pem: bytes

    @property
    def serial_hex(self) -> str:
        return format(self.certificate.serial_number, "x")

    @property
    def not_after(self) -> datetime.datetime:
        return self.certificate.not_valid_after_utc


@dataclass(frozen=True, slots=True)
class MeshCA:
    """The signing CA, every CA gateways should trust (signer first), and what issued certificates look like."""

    cert: x509.Certificate
    key: SigningKey
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    ttl: datetime.timedelta = DEFAULT_TTL
    also_trusted: tuple[x509.Certificate, ...] = ()
    # Derived once (``/v1/ca`` is polled by every gateway): the signing CA first, then the others, each once.
    trusted: tuple[x509.Certificate, ...] = field(init=False, repr=False, compare=False)
    bundle: bytes = field(init=False, repr=False, compare=False)  # the PEM bundle of ``trusted``
    bundle_hash: str = field(init=False, repr=False, compare=False)  # its SHA-256, hex: the ETag

    def __post_init__(self) -> None:
        seen: set[bytes] = set()
        trusted: list[x509.Certificate] = []
        for cert in (self.cert, *self.also_trusted):
            fingerprint = cert.fingerprint(hashes.SHA256())
            if fingerprint not in seen:
                seen.add(fingerprint)
                trusted.append(cert)
        bundle = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in trusted)
        object.__setattr__(self, "trusted", tuple(trusted))
        object.__setattr__(self, "bundle", bundle)
        object.__setattr__(self, "bundle_hash", hashlib.sha256(bundle).hexdigest())

    def identity(self, service: str) -> str:
        return f"spiffe://{self.trust_domain}/service/{service}"

    def issue(self, csr_data: bytes, service: str, now: datetime.datetime, serial: int) -> IssuedCertificate:
        """A certificate for ``service`` over the CSR's public key; ``CsrError`` for a request that is refused.

        Valid from ``now - BACKDATE`` to ``now + ttl`` (never past the signing CA's own end)."""
        if not _SERVICE.fullmatch(service):
            raise ValueError(f"invalid service name {service!r}")
        csr = _parse_csr(csr_data)
        public_key = _checked_public_key(csr)
        identity = self.identity(service)
        is_rsa = isinstance(public_key, rsa.RSAPublicKey)
        not_after = min(now + self.ttl, self.cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True, key_encipherment=is_rsa), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_authority_key_id(self.cert), critical=False)
        )
        certificate = builder.sign(self.key, _hash_for(self.key))
        return IssuedCertificate(certificate, identity, certificate.public_bytes(serialization.Encoding.PEM))


def create_ca(trust_domain: str, now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A new self-signed EC P-256 CA named ``meshgate mesh CA <trust domain>``, valid for 10 years."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshgate mesh CA {trust_domain}")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(new_serial())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def load_pair(cert_file: Path, key_file: Path, now: datetime.datetime) -> tuple[x509.Certificate, SigningKey]:
    """A signing CA from files (PEM; the first certificate of ``cert_file``); ``CaError`` when unusable."""
    cert = _read_certs(cert_file)[0]
    _check_ca(cert, cert_file)
    if cert.not_valid_after_utc <= now:
        raise CaError(f"{cert_file}: the CA certificate expired at {cert.not_valid_after_utc.isoformat()}")
    try:
        key = serialization.load_pem_private_key(_read(key_file), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise CaError(f"{key_file}: not an unencrypted PEM private key ({error})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaError(f"{key_file}: the CA key must be EC P-256/P-384 or RSA >= 2048")
    try:
        _check_key(key.public_key())
    except CsrError as error:
        raise CaError(f"{key_file}: {error}") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != cert.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise CaError(f"{key_file}: the key does not belong to the certificate in {cert_file}")
    return cert, key


def load_trusted(files: Iterable[Path]) -> tuple[x509.Certificate, ...]:
    """Every CA certificate in ``files`` (each may hold several), in order; ``CaError`` for one that is not a CA."""
    out: list[x509.Certificate] = []
    for path in files:
        for cert in _read_certs(path):
            _check_ca(cert, path)
            out.append(cert)
    return tuple(out)


def load_or_create(
    directory: Path, trust_domain: str, now: datetime.datetime
) -> tuple[x509.Certificate, SigningKey, bool]:
    """The CA kept in ``directory`` (``ca.pem``, ``ca.key``), created there (key mode 0600) if there is none; and
    whether it was created now."""
    cert_file, key_file = directory / "ca.pem", directory / "ca.key"
    if cert_file.exists() or key_file.exists():
        if not (cert_file.exists() and key_file.exists()):
            missing = cert_file if not cert_file.exists() else key_file
            raise CaError(f"{missing} is missing (restore it, or remove {directory} to create a new CA)")
        cert, key = load_pair(cert_file, key_file, now)
        return cert, key, False
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert, new_key = create_ca(trust_domain, now)
    pkcs8 = serialization.PrivateFormat.PKCS8
    key_pem = new_key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())
    # The key first, then the certificate: ca.pem existing means the pair is complete (each written by rename).
    _write_atomically(key_file, key_pem, 0o600)
    _write_atomically(cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, new_key, True


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)  # whatever the umask
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise CaError(f"{path}: {error.strerror or error}") from None


def _read_certs(path: Path) -> Sequence[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(_read(path))
    except ValueError:
        raise CaError(f"{path}: no PEM certificate in the file") from None


def _check_ca(cert: x509.Certificate, path: Path) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CaError(f"{path}: {cert.subject.rfc4514_string()} is not a CA certificate (basicConstraints CA:true)")


def _parse_csr(data: bytes) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(data) if b"-----BEGIN" in data else x509.load_der_x509_csr(data)
    except ValueError:
        raise CsrError("the body is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise CsrError("the certificate signing request's signature does not verify")
    return csr


def _checked_public_key(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise CsrError("unsupported public key (use EC P-256/P-384 or RSA >= 2048)") from None
    return _check_key(key)


def _check_key(key: object) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _CURVES:
            raise CsrError(f"unsupported curve {key.curve.name} (use EC P-256/P-384 or RSA >= 2048)")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise CsrError(f"RSA key of {key.key_size} bits is too small (use EC P-256/P-384 or RSA >= 2048)")
        return key
    raise CsrError(f"unsupported public key {type(key).__name__} (use EC P-256/P-384 or RSA >= 2048)")


def _hash_for(key: SigningKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )
