"""The gateway's mesh identity: a private key made in memory, a CSR for it, the config service's answer.

The key never leaves the process: only the CSR (its public half) is sent, with the gateway token, which the config
service has bound to a service; the certificate names that service as ``spiffe://<trust domain>/service/<name>``.
Every certificate gets a fresh key (EC P-256: fast to make, what the mesh CA signs).

``new_key``, ``build_csr`` and ``parse_answer`` are pure (``parse_answer`` checks the answer against the key and
the identity asked for, so a confused or hostile answer is never installed); ``request_certificate`` does the POST.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.mesh.peer import identity_of, uri_sans

__all__ = [
    "IdentityError",
    "MeshCertificate",
    "build_csr",
    "new_key",
    "parse_answer",
    "request_certificate",
    "uri_sans",
]

# Bounds one certificate request; a renewal that times out is retried with backoff.
REQUEST_TIMEOUT = 10.0


class IdentityError(Exception):
    """The config service gave no usable certificate; the message says why (never the token)."""


@dataclass(frozen=True, slots=True)
class MeshCertificate:
    """A mesh certificate and its key, as PEM, with the facts renewal and logs need."""

    cert_pem: bytes  # the leaf (and any intermediates the service sent after it)
    key_pem: bytes  # PKCS#8, unencrypted: lives in memory only
    ca_pem: bytes  # the trust bundle that came with it
    identity: str
    serial: str  # hex, upper-case, as certificate_serial() logs it
    not_before: float  # epoch seconds
    not_after: float

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(key: ec.EllipticCurvePrivateKey, service: str, identity: str) -> bytes:
    """A PEM CSR with CN ``service`` and the URI SAN ``identity`` (the service decides; this says what is asked)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def parse_answer(body: object, key: ec.EllipticCurvePrivateKey, identity: str) -> MeshCertificate:
    """The ``POST /v1/certificates`` answer as a ``MeshCertificate``; ``IdentityError`` unless it is a certificate
    for ``key`` naming ``identity``, usable for both server and client auth, with a CA bundle."""
    if not isinstance(body, dict):
        raise IdentityError("the answer is not a JSON object")
    cert_text, ca_text = body.get("certificate"), body.get("ca")
    if not isinstance(cert_text, str) or not isinstance(ca_text, str):
        raise IdentityError('the answer lacks "certificate" or "ca"')
    try:
        chain = x509.load_pem_x509_certificates(cert_text.encode())
        x509.load_pem_x509_certificates(ca_text.encode())
    except ValueError as exc:
        raise IdentityError(f"the answer holds no valid PEM certificate: {exc}") from None
    leaf = chain[0]
    if leaf.public_key() != key.public_key():
        raise IdentityError("the certificate is not for the key this gateway sent")
    names = uri_sans(leaf)
    if identity not in names:
        raise IdentityError(f"the certificate names {names}, not {identity}")
    # Peers judge it by peer.py's rules (a leaf with exactly this one URI SAN): one they would refuse is refused now.
    if identity_of(leaf, _trust_domain(identity)) != identity:
        raise IdentityError("the certificate is a CA certificate or carries more than one URI SAN")
    if body.get("identity", identity) != identity:
        raise IdentityError(f"the service says {body.get('identity')!r}, this gateway is {identity}")
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None  # no EKU: any use
    if usages is not None and not {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages):
        raise IdentityError("the certificate is not valid for both server and client authentication")
    pkcs8 = serialization.PrivateFormat.PKCS8
    key_pem = key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())
    return MeshCertificate(
        cert_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
        key_pem=key_pem,
        ca_pem=ca_text.encode(),
        identity=identity,
        serial=format(leaf.serial_number, "X"),
        not_before=_epoch(leaf.not_valid_before_utc),
        not_after=_epoch(leaf.not_valid_after_utc),
    )


async def request_certificate(
    session: aiohttp.ClientSession, url: str, token: str, service: str, identity: str
) -> MeshCertificate:
    """POST a CSR for a new key to ``url/v1/certificates``; ``IdentityError`` for any failure."""
    key = new_key()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/x-pem-file"}
    try:
        async with session.post(
            f"{url}/v1/certificates",
            data=build_csr(key, service, identity),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        ) as response:
            text = await response.text()
            if response.status not in (200, 201):
                raise IdentityError(f"the config service answered {response.status}: {_error_text(text)}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise IdentityError(f"cannot reach the config service: {exc or type(exc).__name__}") from None
    try:
        body = json.loads(text)
    except ValueError:
        raise IdentityError("the answer is not JSON") from None
    return parse_answer(body, key, identity)


def _error_text(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return text[:200]
    return str(body.get("error", body) if isinstance(body, dict) else body)[:200]


def _trust_domain(identity: str) -> str:
    return identity.removeprefix("spiffe://").split("/", 1)[0]


def _epoch(moment: datetime.datetime) -> float:
    return moment.timestamp()
