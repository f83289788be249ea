"""JWT bearer verification for the authn stage: header -> token -> verified claims, or ``Unauthenticated(reason)``.

Pure: no I/O and no clock of its own; the caller passes ``now`` (seconds since the epoch) and the ``KeySet``
(``policy/keyset.py`` builds it, ``policy/jwks.py`` fetches and caches it; ``KeySet`` and ``ASYMMETRIC_ALGORITHMS``
are re-exported from here). pyjwt only checks the signature, with the one algorithm this module has already
admitted for the selected key; every other decision (size, structure, algorithm, key choice, time and identity
claims) is made here, in a fixed order, so each rejection has exactly one bounded ``reason`` label.

Defences, and why they sit where they do:
- size first, before any decoding, so an oversized header cannot cost CPU;
- only asymmetric algorithms, never ``none`` nor ``HS*``, whatever the rule says, and each key is bound to the
  algorithm family it can verify (``KeySet`` does that when the set is built); a token naming an algorithm outside
  its key's family is ``disallowed_alg``. That is what defeats algorithm confusion (an HS256 token "signed" with
  the RSA public key as the HMAC secret);
- the key is chosen only from the configured set by ``kid``; ``jku``/``x5u``/``jwk`` headers are ignored, never
  fetched;
- ``crit`` and ``b64`` (RFC 7515/7797 extensions) are refused: we implement none of them.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from jwt import PyJWTError
from jwt.api_jws import PyJWS
from jwt.exceptions import InvalidAlgorithmError, InvalidSignatureError

from policy.keyset import ASYMMETRIC_ALGORITHMS, KeySet, is_safe_kid

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "DEFAULT_MAX_TOKEN_BYTES",
    "REASONS",
    "JwtRule",
    "KeySet",
    "Unauthenticated",
    "bearer_token",
    "check_claims",
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

_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*")
_TOKEN68: Final = re.compile(r"[A-Za-z0-9._~+/-]+=*")
DEFAULT_MAX_TOKEN_BYTES: Final = 8192  # real access tokens are 1-2 KiB; the limit caps work done on junk

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
    key = keys.select(header.get("kid"))
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
    check_claims(claims, rule, now)
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
    if "kid" in header and not is_safe_kid(header["kid"]):  # `"kid": null` included: present means a string
        raise Unauthenticated("malformed", "invalid kid")
    return header


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


def check_claims(claims: Mapping[str, Any], rule: JwtRule, now: float) -> None:
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
