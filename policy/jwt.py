"""JWT bearer verification for the authn stage: header -> token -> verified claims, or ``Unauthenticated(reason)``.

Pure: no I/O and no clock of its own; the caller passes ``now`` (seconds since the epoch) and the ``KeySet``
(``policy/jwks.py`` fetches and caches it). pyjwt only checks the signature, with the one algorithm this module has
already admitted for the selected key; every other decision (size, structure, algorithm, key choice, time and
identity claims) is made here, in a fixed order, so each rejection has exactly one bounded ``reason`` label.

Defences, and why they sit where they do:
- size first, before any decoding, so an oversized header cannot cost CPU;
- only asymmetric algorithms, never ``none`` nor ``HS*``, whatever the rule says, and each key is bound to the
  algorithm family it can verify; a token naming an algorithm outside its key's family is ``disallowed_alg``. That
  is what defeats algorithm confusion (an HS256 token "signed" with the RSA public key as the HMAC secret);
- the key is chosen only from the configured set by ``kid``; ``jku``/``x5u``/``jwk`` headers are ignored, never
  fetched;
- ``crit`` and ``b64`` (RFC 7515/7797 extensions) are refused: we implement none of them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt import PyJWK, PyJWTError
from jwt.api_jws import PyJWS
from jwt.exceptions import InvalidAlgorithmError, InvalidSignatureError

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "DEFAULT_MAX_TOKEN_BYTES",
    "REASONS",
    "JwtRule",
    "KeySet",
    "Unauthenticated",
    "bearer_token",
    "token_kid",
    "verify",
]

REASONS: Final[tuple[str, ...]] = (
    "missing_token",
    "malformed",
    "too_large",
    "disallowed_alg",
    "unknown_kid",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "issued_in_future",
    "wrong_issuer",
    "wrong_audience",
    "keys_unavailable",
)

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

# The default texts go into `WWW-Authenticate: ... error_description="..."`: fixed strings, never token contents.
_DESCRIPTIONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "missing_token": "bearer token required",
        "malformed": "malformed token",
        "too_large": "token too large",
        "disallowed_alg": "token algorithm not allowed",
        "unknown_kid": "signing key not found",
        "bad_signature": "invalid token signature",
        "expired": "token expired",
        "not_yet_valid": "token not yet valid",
        "issued_in_future": "token issued in the future",
        "wrong_issuer": "token issuer not accepted",
        "wrong_audience": "token audience not accepted",
        "keys_unavailable": "signing keys unavailable",
    }
)
assert tuple(_DESCRIPTIONS) == REASONS

# A kid is only ever a dictionary key here, but it also reaches logs and other consumers: keep it short and inert.
_SAFE_KID: Final = re.compile(r"[A-Za-z0-9._~+=:@-]{1,128}")
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*")
_TOKEN68: Final = re.compile(r"[A-Za-z0-9._~+/-]+=*")
_PEM_BLOCK: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)
_MIN_RSA_BITS: Final = 2048  # below this pyjwt warns on every verify; such keys are refused when the set is built
DEFAULT_MAX_TOKEN_BYTES: Final = 8192  # real access tokens are 1-2 KiB; the limit caps work done on junk

PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

# Only asymmetric algorithms are even registered, so a bug upstream of it still cannot reach HMAC or `none`.
_JWS: Final = PyJWS(algorithms=sorted(ASYMMETRIC_ALGORITHMS), options={"enforce_minimum_key_length": True})


class Unauthenticated(Exception):
    """The request carries no acceptable bearer token.

    ``reason`` is one of ``REASONS`` (the ``reason`` label of ``meshgate_authn_failures_total``); ``description`` is
    short fixed text safe to put in ``WWW-Authenticate`` (no token or claim values, no quotes, no control chars).
    """

    reason: str
    description: str

    def __init__(self, reason: str, description: str | None = None) -> None:
        if reason not in _DESCRIPTIONS:
            raise ValueError(f"unknown authn failure reason {reason!r}")
        text = _DESCRIPTIONS[reason] if description is None else description
        # Defensive: whatever a caller passes, it must stay a valid quoted-string in a header.
        text = "".join(c for c in text if c.isprintable() and c not in '"\\')[:120]
        super().__init__(f"{reason}: {text}")
        self.reason = reason
        self.description = text


@dataclass(frozen=True, slots=True)
class JwtRule:
    """What a route accepts. ``audiences`` empty means ``aud`` is not checked; ``issuer`` None means ``iss`` isn't."""

    issuer: str | None
    audiences: frozenset[str]
    algorithms: frozenset[str]
    leeway: float = 30.0
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES
    require_exp: bool = True


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str  # the declared kid, or the RFC 7638 thumbprint when the source declared none
    declared: bool
    key: PublicKey = field(repr=False)
    algorithms: frozenset[str]


@dataclass(frozen=True, slots=True, eq=False)  # identity equality: a MappingProxyType field is not hashable
class KeySet:
    """An immutable set of verification keys, each bound to the algorithms it may verify.

    Built with ``from_jwks`` or ``from_pem``. ``skipped`` says, for operators, which keys were unusable and why.
    """

    _keys: tuple[_Key, ...]
    _by_kid: Mapping[str, _Key]
    skipped: tuple[str, ...] = field(default=())

    @classmethod
    def from_jwks(cls, doc: object) -> KeySet:
        """Keys of a JWKS document (``{"keys": [...]}``). Unusable members are skipped; ValueError if none is left."""
        if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
            raise ValueError('not a JWKS document: expected an object with a "keys" list')
        keys: list[_Key] = []
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
        keys: list[_Key] = []
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
    def _build(cls, keys: Iterable[_Key], skipped: list[str], source: str) -> KeySet:
        by_kid: dict[str, _Key] = {}
        kept: list[_Key] = []
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
        return self._select(kid) is not None

    def _select(self, kid: str | None) -> _Key | None:
        if kid is None:
            # Without a kid the choice would be a guess; only a single-key set makes it unambiguous.
            return self._keys[0] if len(self._keys) == 1 else None
        key = self._by_kid.get(kid)
        if key is None and len(self._keys) == 1 and not self._keys[0].declared:
            # A PEM key cannot carry a kid, while IdPs stamp one anyway: a lone anonymous key answers any kid.
            return self._keys[0]
        return key


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None if the header is absent.

    The scheme is case-insensitive (RFC 7235); exactly one space and one token68 must follow. Anything else (another
    scheme, two tokens, junk) raises ``Unauthenticated("malformed")``.
    """
    if authorization is None:
        return None
    parts = authorization.split(" ")
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise Unauthenticated("malformed", "expected Authorization: Bearer <token>")
    if not _TOKEN68.fullmatch(parts[1]):
        raise Unauthenticated("malformed", "expected Authorization: Bearer <token>")
    return parts[1]


def token_kid(token: str, rule: JwtRule | None = None) -> str | None:
    """The ``kid`` the token's header names (None: no kid), to choose which ``KeySet`` to ask for.

    Runs exactly the checks ``verify`` runs before key selection (size, structure, algorithm), with the same
    reasons, so calling it first changes no outcome, and a junk token or ``alg: none`` cannot make a key source
    refetch. Without ``rule`` the default size limit and every asymmetric algorithm apply.
    """
    if rule is None:
        header = _admit(token, DEFAULT_MAX_TOKEN_BYTES, None)
    else:
        header = _admit(token, rule.max_token_bytes, rule.algorithms)
    kid: str | None = header.get("kid")
    return kid


def verify(token: str, keys: KeySet, rule: JwtRule, now: float) -> dict[str, Any]:
    """The claims of ``token`` once its size, structure, algorithm, key, signature and claims all pass at ``now``.

    Raises ``Unauthenticated`` with the reason of the first check that fails, in that order.
    """
    header = _admit(token, rule.max_token_bytes, rule.algorithms)
    alg = header["alg"]
    key = keys._select(header.get("kid"))
    if key is None:
        raise Unauthenticated("unknown_kid")
    if alg not in key.algorithms:
        raise Unauthenticated("disallowed_alg", "token algorithm does not match its key")

    try:
        # The single admitted algorithm and a raw key object: pyjwt gets no room to choose either.
        decoded = _JWS.decode_complete(token, key.key, algorithms=[alg])
    except InvalidSignatureError:
        raise Unauthenticated("bad_signature") from None
    except InvalidAlgorithmError:
        raise Unauthenticated("disallowed_alg") from None
    except PyJWTError:
        raise Unauthenticated("malformed") from None

    claims = _json_object(decoded["payload"])
    if claims is None:
        raise Unauthenticated("malformed", "payload is not a JSON object")
    _check_claims(claims, rule, now)
    return claims


def _admit(token: str, max_bytes: int, algorithms: frozenset[str] | None) -> dict[str, Any]:
    """Size, then structure, then algorithm: the checks that need no key. Returns the header."""
    if not token:
        raise Unauthenticated("missing_token")
    # Checked on characters before decoding anything; a non-ASCII token is malformed, so chars == bytes.
    if len(token) > max_bytes:
        raise Unauthenticated("too_large")
    if not token.isascii():
        raise Unauthenticated("malformed")
    header = _header(token)
    alg = header["alg"]
    # The hard-coded asymmetric set applies whatever the rule says: `none` and HS* are never admitted.
    if alg not in ASYMMETRIC_ALGORITHMS or (algorithms is not None and alg not in algorithms):
        raise Unauthenticated("disallowed_alg")
    return header


def _header(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3 or not all(_B64URL.fullmatch(part) for part in parts) or not parts[0]:
        raise Unauthenticated("malformed")
    header = _json_object(_b64decode(parts[0]))
    if header is None:
        raise Unauthenticated("malformed", "header is not a JSON object")
    if not isinstance(header.get("alg"), str):
        raise Unauthenticated("malformed", "header has no alg")
    if "crit" in header or "b64" in header:
        raise Unauthenticated("malformed", "unsupported critical header")
    if "kid" in header and not _safe_kid(header["kid"]):  # `"kid": null` included: present means a string
        raise Unauthenticated("malformed", "invalid kid")
    return header


def _safe_kid(kid: object) -> bool:
    return isinstance(kid, str) and _SAFE_KID.fullmatch(kid) is not None and ".." not in kid


def _b64decode(part: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise Unauthenticated("malformed") from None


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """A JSON object, or None; rejects duplicate members and NaN/Infinity, which parsers disagree on."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            raise ValueError("duplicate member")
        return result

    def no_constants(name: str) -> Any:
        raise ValueError(f"non-standard constant {name}")

    try:
        value = json.loads(raw, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _check_claims(claims: Mapping[str, Any], rule: JwtRule, now: float) -> None:
    exp = _number(claims, "exp")
    nbf = _number(claims, "nbf")
    iat = _number(claims, "iat")
    for name in ("iss", "sub", "jti"):
        if name in claims and not isinstance(claims[name], str):
            raise Unauthenticated("malformed", f"claim {name} is not a string")
    aud = claims.get("aud")
    audiences = {aud} if isinstance(aud, str) else set(aud) if isinstance(aud, list) else None
    if "aud" in claims and (audiences is None or not all(isinstance(a, str) for a in audiences)):
        raise Unauthenticated("malformed", "claim aud is not a string or list of strings")

    if exp is None:
        if rule.require_exp:
            raise Unauthenticated("malformed", "claim exp is required")
    elif now > exp + rule.leeway:
        raise Unauthenticated("expired")
    if nbf is not None and now + rule.leeway < nbf:
        raise Unauthenticated("not_yet_valid")
    if iat is not None and iat > now + rule.leeway:
        raise Unauthenticated("issued_in_future")
    if rule.issuer is not None and claims.get("iss") != rule.issuer:
        raise Unauthenticated("wrong_issuer")
    if rule.audiences and not (audiences and rule.audiences.intersection(audiences)):
        raise Unauthenticated("wrong_audience")


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    if name not in claims:
        return None
    value = claims[name]
    # bool is an int in Python, and a JSON `true` is no timestamp.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthenticated("malformed", f"claim {name} is not a number")
    try:
        number = float(value)
    except OverflowError:
        raise Unauthenticated("malformed", f"claim {name} is out of range") from None
    if not math.isfinite(number):  # "1e400" parses to inf
        raise Unauthenticated("malformed", f"claim {name} is out of range")
    return number


def _key_from_jwk(jwk: object) -> _Key:
    """One JWKS member as a bound key, or ValueError saying why it is unusable (never anything else)."""
    if not isinstance(jwk, Mapping):
        raise ValueError("not a JSON object")
    kid = jwk.get("kid")
    if kid is not None and not _safe_kid(kid):  # a token could never name it: `verify` refuses such kids
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


def _bind(public: object, kid: str | None, alg: str | None) -> _Key:
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
        return _Key(_thumbprint(members), False, public, family)
    return _Key(kid, True, public, family)


def _b64uint(value: int, length: int | None = None) -> str:
    raw = value.to_bytes(length or max(1, (value.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _thumbprint(members: Mapping[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, without whitespace."""
    canonical = json.dumps(dict(sorted(members.items())), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()
