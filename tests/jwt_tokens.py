"""Test helpers: real key pairs, their public JWKs / JWKS documents / PEMs, and tokens signed (or forged) by hand.

Tokens are assembled here rather than with ``jwt.encode`` so tests can produce what pyjwt refuses to: a header that
is not an object, a non-string kid, an array payload, ``alg: none``, duplicate members. Signing still uses pyjwt's
real algorithm implementations.

    k = KeyPair.rsa("k1")
    doc = jwks(k, KeyPair.ec("k2"))
    token = k.sign({"sub": "alice", "exp": NOW + 60}, alg="PS256")
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

__all__ = ["KeyPair", "b64url", "forge", "jwks"]

_CURVES: dict[str, tuple[type[ec.EllipticCurve], str]] = {
    "P-256": (ec.SECP256R1, "ES256"),
    "P-384": (ec.SECP384R1, "ES384"),
    "P-521": (ec.SECP521R1, "ES512"),
}


def b64url(raw: bytes) -> str:
    """base64url without padding, as JWS uses it."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _part(value: object) -> str:
    """bytes are taken verbatim; anything else is JSON-encoded first."""
    return b64url(value if isinstance(value, bytes) else json.dumps(value).encode())


def forge(header: object, payload: object, signature: bytes = b"") -> str:
    """A compact token from arbitrary parts (bytes verbatim, other values as JSON), signature given directly."""
    return f"{_part(header)}.{_part(payload)}.{b64url(signature)}"


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A private key with the kid it is published under and the algorithm it signs with by default."""

    kid: str | None
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey = field(repr=False)
    alg: str

    @classmethod
    def rsa(cls, kid: str | None = "rsa-1", bits: int = 2048) -> KeyPair:
        return cls(kid, rsa.generate_private_key(public_exponent=65537, key_size=bits), "RS256")

    @classmethod
    def ec(cls, kid: str | None = "ec-1", curve: str = "P-256") -> KeyPair:
        curve_type, alg = _CURVES[curve]
        return cls(kid, ec.generate_private_key(curve_type()), alg)

    @classmethod
    def ed25519(cls, kid: str | None = "ed-1") -> KeyPair:
        return cls(kid, ed25519.Ed25519PrivateKey.generate(), "EdDSA")

    def jwk(self, **extra: Any) -> dict[str, Any]:
        """The public JWK, with ``kid`` (if any) and ``extra`` members (``alg``, ``use``...) merged in."""
        algorithm = get_default_algorithms()[self.alg]
        doc: dict[str, Any] = json.loads(algorithm.to_jwk(self.private_key.public_key()))
        if self.kid is not None:
            doc["kid"] = self.kid
        doc.update(extra)
        return doc

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def signature(self, signing_input: bytes, alg: str | None = None) -> bytes:
        return bytes(get_default_algorithms()[alg or self.alg].sign(signing_input, self.private_key))

    def sign(self, claims: object, alg: str | None = None, headers: Mapping[str, Any] | None = None) -> str:
        """A token over ``claims`` (any JSON value, or raw bytes) signed with this key.

        The header is ``{"alg", "typ": "JWT", "kid"}`` updated with ``headers``; a ``None`` value removes a member,
        and ``header_raw`` in ``headers`` replaces the whole header with those bytes.
        """
        alg = alg or self.alg
        header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
        if self.kid is not None:
            header["kid"] = self.kid
        header.update(headers or {})
        raw = header.pop("header_raw", None)
        header = {name: value for name, value in header.items() if value is not None}
        signing_input = f"{_part(raw if raw is not None else header)}.{_part(claims)}"
        return f"{signing_input}.{b64url(self.signature(signing_input.encode(), alg))}"


def jwks(*pairs: KeyPair, **extra: Any) -> dict[str, Any]:
    """A JWKS document publishing the public halves of ``pairs`` (``extra`` merged into every JWK)."""
    return {"keys": [pair.jwk(**extra) for pair in pairs]}
