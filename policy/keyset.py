"""Verification keys for JWT bearer tokens: a ``KeySet`` built from a JWKS document or PEM, each key bound to the
algorithm family it can verify, and chosen by ``kid``.

Pure: parsing and selection only (``policy/jwks.py`` fetches and caches sets; ``policy/jwt.py`` verifies tokens
against them). Keys are checked when the set is built: only public RSA (>= 2048 bits), EC P-256/384/521 and Ed25519
keys meant for signature verification are kept, and unusable ones are listed in ``skipped``; a JWK ``alg`` narrows
its key to that one algorithm; a key without a kid (any PEM key) is addressed by its RFC 7638 thumbprint.
This module also owns the facts both sides share: which algorithms exist at all (``ASYMMETRIC_ALGORITHMS``) and
what a usable kid looks like (``is_safe_kid``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt import PyJWK, PyJWTError

__all__ = ["ASYMMETRIC_ALGORITHMS", "Key", "KeySet", "PublicKey", "is_safe_kid"]

_RSA_ALGS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGS: Final[Mapping[str, str]] = MappingProxyType(
    {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
)
# Every signature algorithm a public key can verify, in the order messages list them.
ASYMMETRIC_ALGORITHMS: Final = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)

# A kid is only ever a dictionary key here, but it also reaches logs and other consumers: keep it short and inert.
_SAFE_KID: Final = re.compile(r"[A-Za-z0-9._~+=:@-]{1,128}")
_PEM_BLOCK: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)
_MIN_RSA_BITS: Final = 2048  # below this pyjwt warns on every verify; such keys are refused when the set is built

PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def is_safe_kid(kid: object) -> bool:
    """Whether ``kid`` is a short string of safe characters (the only kids a token header or a JWK may carry)."""
    return isinstance(kid, str) and _SAFE_KID.fullmatch(kid) is not None and ".." not in kid


@dataclass(frozen=True, slots=True)
class Key:
    """One verification key and the algorithms it may verify."""

    kid: str  # the declared kid, or the RFC 7638 thumbprint when the source declared none
    declared: bool
    key: PublicKey = field(repr=False)
    algorithms: frozenset[str]


@dataclass(frozen=True, slots=True, eq=False)  # identity equality: a MappingProxyType field is not hashable
class KeySet:
    """An immutable set of verification keys, each bound to the algorithms it may verify.

    Built with ``from_jwks`` or ``from_pem``. ``skipped`` says, for operators, which keys were unusable and why.
    """

    _keys: tuple[Key, ...]
    _by_kid: Mapping[str, Key]
    skipped: tuple[str, ...] = field(default=())

    @classmethod
    def from_jwks(cls, doc: object) -> KeySet:
        """Keys of a JWKS document (``{"keys": [...]}``). Unusable members are skipped; ValueError if none is left."""
        if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
            raise ValueError('not a JWKS document: expected an object with a "keys" list')
        keys: list[Key] = []
        skipped: list[str] = []
        for index, jwk in enumerate(doc["keys"]):
            try:
                keys.append(_key_from_jwk(jwk))
            except ValueError as error:
                skipped.append(f"keys[{index}]: {error}")
        return cls._build(keys, skipped, "JWKS")

    @classmethod
    def from_pem(cls, pem: bytes) -> KeySet:
        """Public keys (SPKI ``PUBLIC KEY``, PKCS#1 ``RSA PUBLIC KEY``) or certificates, in PEM.

        PEM carries no kid, so each key's kid is its RFC 7638 thumbprint (and a lone key answers any kid).
        Private keys are refused rather than silently reduced to their public half: they do not belong on a gateway.
        """
        blocks = list(_PEM_BLOCK.finditer(pem))
        if not blocks:
            raise ValueError("no PEM block found")
        keys: list[Key] = []
        skipped: list[str] = []
        for index, match in enumerate(blocks):
            label = match.group(1).decode()
            if "PRIVATE" in label:
                raise ValueError(f"PEM block {index} is a private key; configure the public key only")
            try:
                if label == "CERTIFICATE":
                    public: object = x509.load_pem_x509_certificate(match.group(0)).public_key()
                elif label in ("PUBLIC KEY", "RSA PUBLIC KEY"):
                    public = load_pem_public_key(match.group(0))
                else:
                    raise ValueError(f"unsupported PEM block {label!r}")
                keys.append(_bind(public, None, None))
            except (ValueError, UnsupportedAlgorithm) as error:
                skipped.append(f"PEM block {index}: {error}")
        return cls._build(keys, skipped, "PEM")

    @classmethod
    def _build(cls, keys: Iterable[Key], skipped: list[str], source: str) -> KeySet:
        by_kid: dict[str, Key] = {}
        kept: list[Key] = []
        for key in keys:
            if key.kid in by_kid:
                skipped.append(f"kid {key.kid!r}: duplicate, first one kept")
                continue
            by_kid[key.kid] = key
            kept.append(key)
        if not kept:
            detail = "; ".join(skipped) if skipped else "it is empty"
            raise ValueError(f"{source} has no usable signature verification key ({detail})")
        return cls(tuple(kept), MappingProxyType(by_kid), tuple(skipped))

    @property
    def kids(self) -> frozenset[str]:
        """The kids a token may name: declared ones, and thumbprints of keys that declared none."""
        return frozenset(self._by_kid)

    def __len__(self) -> int:
        return len(self._keys)

    def resolves(self, kid: str | None) -> bool:
        """Whether a token with this ``kid`` (None: no kid header) selects a key; False means a refetch might help."""
        return self.select(kid) is not None

    def select(self, kid: str | None) -> Key | None:
        """The key a token with this ``kid`` (None: no kid header) is verified with, or None if no key fits."""
        if kid is None:
            # Without a kid the choice would be a guess; only a single-key set makes it unambiguous.
            return self._keys[0] if len(self._keys) == 1 else None
        key = self._by_kid.get(kid)
        if key is None and len(self._keys) == 1 and not self._keys[0].declared:
            # A PEM key cannot carry a kid, while IdPs stamp one anyway: a lone anonymous key answers any kid.
            return self._keys[0]
        return key


def _key_from_jwk(jwk: object) -> Key:
    """One JWKS member as a bound key, or ValueError saying why it is unusable (never anything else)."""
    if not isinstance(jwk, Mapping):
        raise ValueError("not a JSON object")
    kid = jwk.get("kid")
    if kid is not None and not is_safe_kid(kid):  # a token could never name it: `verify` refuses such kids
        raise ValueError("kid is not a short string of safe characters")
    label = f"kid {kid!r}" if kid else "key"
    if jwk.get("use", "sig") != "sig":
        raise ValueError(f"{label}: use is not sig")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ValueError(f"{label}: key_ops does not allow verify")
    if jwk.get("kty") not in ("RSA", "EC", "OKP"):
        raise ValueError(f"{label}: unsupported kty")
    alg = jwk.get("alg")
    if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
        raise ValueError(f"{label}: unsupported alg")
    try:
        # Parsed by kty/crv alone; `alg` is checked against the key's real family in `_bind`, with a clearer message.
        parsed = PyJWK({name: value for name, value in jwk.items() if name != "alg"}).key
    except (PyJWTError, ValueError, TypeError, KeyError, AttributeError, UnsupportedAlgorithm) as error:
        raise ValueError(f"{label}: {type(error).__name__}") from None
    # Only the public half is ever used, even if an IdP mistakenly publishes `d`.
    public = parsed.public_key() if hasattr(parsed, "public_key") else parsed
    return _bind(public, kid, alg)


def _bind(public: object, kid: str | None, alg: str | None) -> Key:
    """Bind a public key to its algorithm family (narrowed to ``alg`` when the JWK names one)."""
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < _MIN_RSA_BITS:
            raise ValueError(f"RSA key of {public.key_size} bits is below {_MIN_RSA_BITS}")
        family = _RSA_ALGS
        members = {"e": _b64uint(public.public_numbers().e), "kty": "RSA", "n": _b64uint(public.public_numbers().n)}
    elif isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name in _EC_ALGS:
        family = frozenset({_EC_ALGS[public.curve.name]})
        size = (public.curve.key_size + 7) // 8
        numbers = public.public_numbers()
        crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[public.curve.name]
        members = {"crv": crv, "kty": "EC", "x": _b64uint(numbers.x, size), "y": _b64uint(numbers.y, size)}
    elif isinstance(public, ed25519.Ed25519PublicKey):
        family = frozenset({"EdDSA"})
        raw = public.public_bytes_raw()
        members = {"crv": "Ed25519", "kty": "OKP", "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode()}
    else:
        raise ValueError(f"unsupported key type {type(public).__name__}")
    if alg is not None:
        if alg not in family:
            raise ValueError(f"alg {alg} does not fit the key type")
        family = frozenset({alg})
    if kid is None:
        return Key(_thumbprint(members), False, public, family)
    return Key(kid, True, public, family)


def _b64uint(value: int, length: int | None = None) -> str:
    raw = value.to_bytes(length or max(1, (value.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _thumbprint(members: Mapping[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, without whitespace."""
    canonical = json.dumps(dict(sorted(members.items())), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()
