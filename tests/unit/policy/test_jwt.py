"""policy/jwt.py with real keys and real signatures: happy paths, leeway edges, key selection, the attack corpus.

Every rejection is asserted with its exact ``reason``; ``now`` is injected, so nothing depends on the wall clock.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from policy.jwt import (
    ASYMMETRIC_ALGORITHMS,
    REASONS,
    JwtRule,
    KeySet,
    Unauthenticated,
    bearer_token,
    token_kid,
    verify,
)
from tests.jwt_tokens import KeyPair, b64url, forge, jwks

NOW = 1_700_000_000.0
ISS = "https://idp.example"

RSA = KeyPair.rsa("rsa-1")
RSA_OTHER = KeyPair.rsa("rsa-1")  # same kid, different key: a forger's key
EC256 = KeyPair.ec("ec-256", "P-256")
EC384 = KeyPair.ec("ec-384", "P-384")
EC521 = KeyPair.ec("ec-521", "P-521")
ED = KeyPair.ed25519("ed-1")

KEYS = KeySet.from_jwks(jwks(RSA, EC256, EC384, EC521, ED))
RULE = JwtRule(issuer=ISS, audiences=frozenset({"orders"}), algorithms=ASYMMETRIC_ALGORITHMS)


def claims(**changes: Any) -> dict[str, Any]:
    """Valid claims at NOW; a change to None removes the claim."""
    base: dict[str, Any] = {"iss": ISS, "aud": "orders", "sub": "alice", "iat": NOW - 10, "exp": NOW + 300}
    base.update(changes)
    return {name: value for name, value in base.items() if value is not None}


def reason_of(token: str, keys: KeySet = KEYS, rule: JwtRule = RULE, now: float = NOW) -> str | None:
    try:
        verify(token, keys, rule, now)
    except Unauthenticated as error:
        failure = error
    else:
        return None
    # The description goes into a response header: never a piece of the token.
    assert all(part not in failure.description for part in token.split(".") if len(part) > 3)
    assert '"' not in failure.description
    return failure.reason


# --- happy paths -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pair", "alg"),
    [
        (RSA, "RS256"),
        (RSA, "RS384"),
        (RSA, "RS512"),
        (RSA, "PS256"),
        (RSA, "PS512"),
        (EC256, "ES256"),
        (EC384, "ES384"),
        (EC521, "ES512"),
        (ED, "EdDSA"),
    ],
)
def test_valid_token_returns_its_claims(pair: KeyPair, alg: str) -> None:
    token = pair.sign(claims(role="admin"), alg=alg)
    assert verify(token, KEYS, RULE, NOW) == claims(role="admin")


# --- time claims and leeway (30 s by default) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "now", "rule", "reason"),
    [
        pytest.param({"exp": NOW}, NOW + 30, RULE, None, id="exp-at-leeway-edge"),
        pytest.param({"exp": NOW}, NOW + 30.001, RULE, "expired", id="exp-past-leeway"),
        pytest.param(
            {"exp": NOW, "iat": NOW - 60},
            NOW,
            JwtRule(ISS, frozenset(), ASYMMETRIC_ALGORITHMS, 0),
            None,
            id="exp-now-no-leeway",
        ),
        pytest.param(
            {"exp": NOW - 1},
            NOW,
            JwtRule(ISS, frozenset(), ASYMMETRIC_ALGORITHMS, 0),
            "expired",
            id="exp-past-no-leeway",
        ),
        pytest.param({"nbf": NOW + 30}, NOW, RULE, None, id="nbf-at-leeway-edge"),
        pytest.param({"nbf": NOW + 30.5}, NOW, RULE, "not_yet_valid", id="nbf-beyond-leeway"),
        pytest.param({"iat": NOW + 30}, NOW, RULE, None, id="iat-at-leeway-edge"),
        pytest.param({"iat": NOW + 31}, NOW, RULE, "issued_in_future", id="iat-in-future"),
        pytest.param({"exp": None}, NOW, RULE, "malformed", id="exp-required"),
        pytest.param(
            {"exp": None},
            NOW,
            JwtRule(ISS, frozenset(), ASYMMETRIC_ALGORITHMS, require_exp=False),
            None,
            id="exp-optional",
        ),
        pytest.param({"exp": int(NOW) + 60, "iat": int(NOW)}, NOW, RULE, None, id="integer-times"),
    ],
)
def test_time_claims(changes: dict[str, Any], now: float, rule: JwtRule, reason: str | None) -> None:
    assert reason_of(RSA.sign(claims(**changes)), rule=rule, now=now) == reason


# --- issuer and audience -----------------------------------------------------------------------------------------

ANY_AUD = JwtRule(ISS, frozenset(), ASYMMETRIC_ALGORITHMS)
ANY_ISS = JwtRule(None, frozenset({"orders"}), ASYMMETRIC_ALGORITHMS)
TWO_AUD = JwtRule(ISS, frozenset({"orders", "billing"}), ASYMMETRIC_ALGORITHMS)


@pytest.mark.parametrize(
    ("changes", "rule", "reason"),
    [
        pytest.param({"aud": "orders"}, RULE, None, id="aud-string"),
        pytest.param({"aud": ["web", "orders"]}, RULE, None, id="aud-list"),
        pytest.param({"aud": ["billing"]}, TWO_AUD, None, id="aud-any-of-rule"),
        pytest.param({"aud": "web"}, RULE, "wrong_audience", id="aud-string-wrong"),
        pytest.param({"aud": ["web", "admin"]}, RULE, "wrong_audience", id="aud-list-wrong"),
        pytest.param({"aud": []}, RULE, "wrong_audience", id="aud-empty-list"),
        pytest.param({"aud": None}, RULE, "wrong_audience", id="aud-missing"),
        pytest.param({"aud": "anything"}, ANY_AUD, None, id="aud-unchecked"),
        pytest.param({"aud": 7}, RULE, "malformed", id="aud-number"),
        pytest.param({"aud": ["orders", 7]}, RULE, "malformed", id="aud-list-with-number"),
        pytest.param({"iss": "https://evil.example"}, RULE, "wrong_issuer", id="iss-wrong"),
        pytest.param({"iss": None}, RULE, "wrong_issuer", id="iss-missing"),
        pytest.param({"iss": ISS + "/"}, RULE, "wrong_issuer", id="iss-trailing-slash"),
        pytest.param({"iss": "https://other.example"}, ANY_ISS, None, id="iss-unchecked"),
        pytest.param({"iss": ["https://idp.example"]}, RULE, "malformed", id="iss-list"),
        pytest.param({"sub": 42}, RULE, "malformed", id="sub-number"),
    ],
)
def test_identity_claims(changes: dict[str, Any], rule: JwtRule, reason: str | None) -> None:
    assert reason_of(EC256.sign(claims(**changes)), rule=rule) == reason


# --- key selection -----------------------------------------------------------------------------------------------

NO_KID = KeyPair.rsa(None)


@pytest.mark.parametrize(
    ("keys", "token", "reason"),
    [
        pytest.param(KeySet.from_jwks(jwks(RSA)), RSA.sign(claims(), headers={"kid": None}), None, id="no-kid-one-key"),
        pytest.param(
            KeySet.from_jwks(jwks(RSA, EC256)),
            RSA.sign(claims(), headers={"kid": None}),
            "unknown_kid",
            id="no-kid-two-keys",
        ),
        pytest.param(KEYS, RSA.sign(claims(), headers={"kid": "nope"}), "unknown_kid", id="unknown-kid"),
        pytest.param(
            KeySet.from_jwks(jwks(NO_KID)),
            NO_KID.sign(claims(), headers={"kid": "idp-stamped"}),
            None,
            id="anonymous-key-answers-any-kid",
        ),
        pytest.param(
            KeySet.from_jwks(jwks(NO_KID, RSA)),
            NO_KID.sign(claims(), headers={"kid": "x"}),
            "unknown_kid",
            id="anonymous-key-among-others",
        ),
        pytest.param(KeySet.from_pem(RSA.public_pem()), RSA.sign(claims()), None, id="pem-one-key"),
        pytest.param(
            KeySet.from_pem(RSA.public_pem() + EC256.public_pem()),
            EC256.sign(claims()),
            "unknown_kid",
            id="pem-two-keys-declared-kid",
        ),
    ],
)
def test_key_selection(keys: KeySet, token: str, reason: str | None) -> None:
    assert reason_of(token, keys=keys) == reason


def test_pem_keys_are_addressed_by_thumbprint() -> None:
    keys = KeySet.from_pem(RSA.public_pem() + b"\n" + EC256.public_pem())
    for pair in (RSA, EC256):
        thumbprint = KeySet.from_jwks(jwks(KeyPair(None, pair.private_key, pair.alg))).kids
        (kid,) = thumbprint
        assert kid in keys.kids
        assert verify(pair.sign(claims(), headers={"kid": kid}), keys, RULE, NOW)["sub"] == "alice"


def test_thumbprint_matches_rfc7638_example() -> None:
    # RFC 7638 section 3.1: this RSA key's thumbprint is NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs.
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3o"
        "knjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHz"
        "u6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8"
        "awapJzKnqDKgw"
    )
    keys = KeySet.from_jwks({"keys": [{"kty": "RSA", "n": n, "e": "AQAB"}]})
    assert keys.kids == {"NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"}


# --- the attack corpus -------------------------------------------------------------------------------------------


def hs256_with_public_key_as_secret() -> str:
    """The classic confusion: HMAC "signed" with the RSA public key PEM that the verifier holds."""
    signing_input = f"{b64url(json.dumps({'alg': 'HS256', 'typ': 'JWT', 'kid': 'rsa-1'}).encode())}"
    signing_input += f".{b64url(json.dumps(claims(sub='admin')).encode())}"
    mac = hmac.new(RSA.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def tampered() -> str:
    header, _, signature = RSA.sign(claims()).split(".")
    return f"{header}.{b64url(json.dumps(claims(sub='admin')).encode())}.{signature}"


def signed_payload(raw: bytes) -> str:
    return RSA.sign(raw)


def drop(token: str, index: int) -> str:
    parts = token.split(".")
    del parts[index]
    return ".".join(parts)


ALL_ALGS_INCLUDING_HMAC = JwtRule(ISS, frozenset({"orders"}), frozenset(ASYMMETRIC_ALGORITHMS) | {"HS256", "none"})
RS256_ONLY = JwtRule(ISS, frozenset({"orders"}), frozenset({"RS256"}))
PINNED = KeySet.from_jwks(jwks(RSA, alg="RS256"))

ATTACKS: list[tuple[str, Callable[[], str], JwtRule, KeySet, str]] = [
    ("alg-none", lambda: forge({"alg": "none"}, claims()), RULE, KEYS, "disallowed_alg"),
    ("alg-none-kid", lambda: forge({"alg": "none", "kid": "rsa-1"}, claims()), RULE, KEYS, "disallowed_alg"),
    ("alg-None-case", lambda: forge({"alg": "None"}, claims()), ALL_ALGS_INCLUDING_HMAC, KEYS, "disallowed_alg"),
    ("alg-none-rule-allows", lambda: forge({"alg": "none"}, claims()), ALL_ALGS_INCLUDING_HMAC, KEYS, "disallowed_alg"),
    ("alg-confusion-hs256", hs256_with_public_key_as_secret, RULE, KEYS, "disallowed_alg"),
    (
        "alg-confusion-rule-allows-hs256",
        hs256_with_public_key_as_secret,
        ALL_ALGS_INCLUDING_HMAC,
        KEYS,
        "disallowed_alg",
    ),
    (
        "alg-outside-key-family",
        lambda: EC256.sign(claims(), alg="ES256", headers={"kid": "rsa-1"}),
        RULE,
        KEYS,
        "disallowed_alg",
    ),
    (
        "ec-curve-mismatch",
        lambda: EC256.sign(claims(), alg="ES256", headers={"kid": "ec-384"}),
        RULE,
        KEYS,
        "disallowed_alg",
    ),
    ("alg-not-in-rule", lambda: RSA.sign(claims(), alg="PS256"), RS256_ONLY, KEYS, "disallowed_alg"),
    ("alg-not-pinned-by-jwk", lambda: RSA.sign(claims(), alg="PS256"), RULE, PINNED, "disallowed_alg"),
    ("alg-unknown", lambda: forge({"alg": "RS1024", "kid": "rsa-1"}, claims(), b"x"), RULE, KEYS, "disallowed_alg"),
    ("alg-missing", lambda: forge({"kid": "rsa-1"}, claims(), b"x"), RULE, KEYS, "malformed"),
    ("alg-not-string", lambda: forge({"alg": ["RS256"]}, claims(), b"x"), RULE, KEYS, "malformed"),
    ("expired", lambda: RSA.sign(claims(exp=NOW - 31)), RULE, KEYS, "expired"),
    ("not-yet-valid", lambda: RSA.sign(claims(nbf=NOW + 3600)), RULE, KEYS, "not_yet_valid"),
    ("iat-in-future", lambda: RSA.sign(claims(iat=NOW + 3600)), RULE, KEYS, "issued_in_future"),
    ("wrong-issuer", lambda: RSA.sign(claims(iss="https://evil.example")), RULE, KEYS, "wrong_issuer"),
    ("wrong-audience", lambda: RSA.sign(claims(aud="billing")), RULE, KEYS, "wrong_audience"),
    ("unknown-kid", lambda: RSA.sign(claims(), headers={"kid": "rsa-9"}), RULE, KEYS, "unknown_kid"),
    ("tampered-payload", tampered, RULE, KEYS, "bad_signature"),
    ("signed-by-other-key-same-kid", lambda: RSA_OTHER.sign(claims()), RULE, KEYS, "bad_signature"),
    ("signature-empty", lambda: drop(RSA.sign(claims()), 2) + ".", RULE, KEYS, "bad_signature"),
    ("ec-signature-empty", lambda: drop(EC256.sign(claims()), 2) + ".", RULE, KEYS, "bad_signature"),
    ("signature-dropped", lambda: drop(RSA.sign(claims()), 2), RULE, KEYS, "malformed"),
    ("payload-dropped", lambda: drop(RSA.sign(claims()), 1), RULE, KEYS, "malformed"),
    ("header-only", lambda: RSA.sign(claims()).split(".")[0], RULE, KEYS, "malformed"),
    ("four-parts", lambda: RSA.sign(claims()) + ".e30", RULE, KEYS, "malformed"),
    ("padded-parts", lambda: RSA.sign(claims()).replace(".", "==.", 1), RULE, KEYS, "malformed"),
    ("not-base64url", lambda: "eyJ!!!.e30.e30", RULE, KEYS, "malformed"),
    ("non-ascii", lambda: RSA.sign(claims()) + "é", RULE, KEYS, "malformed"),
    ("oversized-signed", lambda: RSA.sign(claims(pad="x" * 9000)), RULE, KEYS, "too_large"),
    ("oversized-junk", lambda: "." * 10_000, RULE, KEYS, "too_large"),
    ("kid-path-traversal", lambda: RSA.sign(claims(), headers={"kid": "../../etc/passwd"}), RULE, KEYS, "malformed"),
    ("kid-slash", lambda: RSA.sign(claims(), headers={"kid": "a/b"}), RULE, KEYS, "malformed"),
    ("kid-backslash", lambda: RSA.sign(claims(), headers={"kid": "a\\b"}), RULE, KEYS, "malformed"),
    ("kid-nul", lambda: RSA.sign(claims(), headers={"kid": "rsa-1\x00"}), RULE, KEYS, "malformed"),
    ("kid-too-long", lambda: RSA.sign(claims(), headers={"kid": "k" * 129}), RULE, KEYS, "malformed"),
    ("kid-empty", lambda: RSA.sign(claims(), headers={"kid": ""}), RULE, KEYS, "malformed"),
    ("kid-number", lambda: RSA.sign(claims(), headers={"kid": 1}), RULE, KEYS, "malformed"),
    ("kid-null", lambda: forge({"alg": "RS256", "kid": None}, claims(), b"x"), RULE, KEYS, "malformed"),
    ("kid-object", lambda: RSA.sign(claims(), headers={"kid": {"$ne": ""}}), RULE, KEYS, "malformed"),
    ("header-not-json", lambda: forge(b"not json", claims(), b"x"), RULE, KEYS, "malformed"),
    ("header-array", lambda: forge(["RS256"], claims(), b"x"), RULE, KEYS, "malformed"),
    ("header-duplicate-alg", lambda: forge(b'{"alg":"none","alg":"RS256"}', claims(), b"x"), RULE, KEYS, "malformed"),
    ("header-crit", lambda: RSA.sign(claims(), headers={"crit": ["exp"]}), RULE, KEYS, "malformed"),
    ("header-b64-false", lambda: RSA.sign(claims(), headers={"b64": False, "crit": ["b64"]}), RULE, KEYS, "malformed"),
    ("payload-array", lambda: RSA.sign([claims()]), RULE, KEYS, "malformed"),
    ("payload-string", lambda: RSA.sign("alice"), RULE, KEYS, "malformed"),
    ("payload-not-json", lambda: signed_payload(b"{sub: alice}"), RULE, KEYS, "malformed"),
    (
        "payload-duplicate-sub",
        lambda: signed_payload(b'{"sub":"alice","sub":"admin","exp":1700000300}'),
        RULE,
        KEYS,
        "malformed",
    ),
    ("exp-string", lambda: RSA.sign(claims(exp=str(NOW + 300))), RULE, KEYS, "malformed"),
    ("exp-bool", lambda: RSA.sign(claims(exp=True)), RULE, KEYS, "malformed"),
    ("exp-infinite", lambda: signed_payload(b'{"exp":1e400}'), RULE, KEYS, "malformed"),
    ("exp-nan", lambda: signed_payload(b'{"exp":NaN}'), RULE, KEYS, "malformed"),
    ("exp-huge-int", lambda: signed_payload(b'{"exp":' + b"9" * 400 + b"}"), RULE, KEYS, "malformed"),
    ("nbf-string", lambda: RSA.sign(claims(nbf="soon")), RULE, KEYS, "malformed"),
    ("iat-null", lambda: RSA.sign(claims(iat=None) | {"iat": None}), RULE, KEYS, "malformed"),
    ("empty-token", lambda: "", RULE, KEYS, "missing_token"),
]


@pytest.mark.parametrize(
    ("make", "rule", "keys", "reason"),
    [pytest.param(make, rule, keys, reason, id=name) for name, make, rule, keys, reason in ATTACKS],
)
def test_attack_corpus(make: Callable[[], str], rule: JwtRule, keys: KeySet, reason: str) -> None:
    assert reason_of(make(), keys=keys, rule=rule) == reason


def test_huge_number_claim_is_rejected_not_overflowed() -> None:
    # exp = 10**400 is finite as an int but overflows float(): still a clean "malformed", never an exception.
    assert reason_of(signed_payload(b'{"exp":1' + b"0" * 400 + b"}")) == "malformed"


@pytest.mark.parametrize(
    ("make", "rule", "keys", "reason"),
    [pytest.param(make, rule, keys, reason, id=name) for name, make, rule, keys, reason in ATTACKS],
)
def test_token_kid_agrees_with_verify(make: Callable[[], str], rule: JwtRule, keys: KeySet, reason: str) -> None:
    """token_kid runs verify's pre-key checks: where it fails, verify fails the same way; else it names the kid."""
    token = make()
    try:
        kid = token_kid(token, rule)
    except Unauthenticated as error:
        early: str | None = error.reason
    else:
        early = None
        header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
        assert kid == header.get("kid")
    assert early in (None, reason)
    assert early is not None or reason not in ("missing_token", "too_large")


@pytest.mark.parametrize(
    ("token", "rule", "expected"),
    [
        (RSA.sign(claims()), None, "rsa-1"),
        (RSA.sign(claims(), headers={"kid": None}), None, None),
        (RSA.sign(claims(), alg="PS256"), RS256_ONLY, "disallowed_alg"),
        (RSA.sign(claims(pad="x" * 9000)), None, "too_large"),
        (
            RSA.sign(claims(pad="x" * 9000)),
            JwtRule(ISS, frozenset(), ASYMMETRIC_ALGORITHMS, max_token_bytes=16384),
            "rsa-1",
        ),
        (forge({"alg": "HS256", "kid": "rsa-1"}, claims(), b"x"), None, "disallowed_alg"),
        (forge({"alg": "none", "kid": "new"}, claims()), None, "disallowed_alg"),
    ],
)
def test_token_kid(token: str, rule: JwtRule | None, expected: str | None) -> None:
    if expected in REASONS:
        with pytest.raises(Unauthenticated) as caught:
            token_kid(token, rule)
        assert caught.value.reason == expected
    else:
        assert token_kid(token, rule) == expected


# --- bearer_token ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc.def.ghi", "abc.def.ghi"),
        ("BEARER abc", "abc"),
        ("Bearer abc+/~=", "abc+/~="),
    ],
)
def test_bearer_token_accepts(header: str | None, expected: str | None) -> None:
    assert bearer_token(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        "Basic dXNlcjpwYXNz",
        "Bearer a.b.c d.e.f",
        "Bearer",
        "Bearer ",
        "Bearer  abc",
        " Bearer abc",
        "Bearerabc",
        "",
        "Bearer abc\n",
        'Bearer ab"c',
        "Bearer a,b",
        "Token abc",
    ],
)
def test_bearer_token_rejects(header: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        bearer_token(header)
    assert caught.value.reason == "malformed"


# --- Unauthenticated ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", REASONS)
def test_every_reason_has_header_safe_text(reason: str) -> None:
    error = Unauthenticated(reason)
    assert error.reason == reason
    assert error.description
    assert error.description.isprintable()
    assert '"' not in error.description


def test_description_is_sanitized_and_reason_bounded() -> None:
    assert Unauthenticated("malformed", 'a "quoted"\r\nthing').description == "a quotedthing"
    with pytest.raises(ValueError, match="unknown authn failure reason"):
        Unauthenticated("because")


# --- building key sets -------------------------------------------------------------------------------------------

SMALL_RSA = KeyPair.rsa("small", bits=1024)


@pytest.mark.parametrize(
    ("member", "why"),
    [
        pytest.param({"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}, "unsupported kty", id="symmetric"),
        pytest.param(RSA.jwk(use="enc"), "use is not sig", id="encryption-key"),
        pytest.param(RSA.jwk(key_ops=["encrypt"]), "key_ops", id="key-ops-without-verify"),
        pytest.param(RSA.jwk(alg="HS256"), "unsupported alg", id="rsa-key-pinned-to-hmac"),
        pytest.param(RSA.jwk(alg="RSA-OAEP"), "unsupported alg", id="rsa-key-pinned-to-encryption"),
        pytest.param(RSA.jwk(alg="ES256"), "does not fit", id="rsa-key-pinned-to-ec"),
        pytest.param(EC256.jwk(alg="ES384"), "does not fit", id="p256-key-pinned-to-es384"),
        pytest.param(SMALL_RSA.jwk(), "1024 bits", id="rsa-1024"),
        pytest.param({"kty": "RSA", "kid": "x", "e": "AQAB"}, "kid 'x'", id="rsa-without-n"),
        pytest.param({"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"}, "key", id="secp256k1"),
        pytest.param({"kty": "OKP", "crv": "X25519", "x": "AA"}, "key", id="x25519"),
        pytest.param({"kty": "RSA", "n": 5, "e": []}, "key", id="wrong-types"),
        pytest.param(RSA.jwk(kid="../x"), "safe characters", id="unsafe-kid"),
        pytest.param(RSA.jwk(kid=7), "safe characters", id="numeric-kid"),
        pytest.param("not a key", "not a JSON object", id="string-member"),
        pytest.param(None, "not a JSON object", id="null-member"),
    ],
)
def test_unusable_jwks_members_are_skipped_with_a_reason(member: object, why: str) -> None:
    keys = KeySet.from_jwks({"keys": [member, EC256.jwk()]})
    assert keys.kids == {"ec-256"}
    assert len(keys) == 1
    assert len(keys.skipped) == 1
    assert why in keys.skipped[0]
    with pytest.raises(ValueError, match="JWKS has no usable signature verification key") as caught:
        KeySet.from_jwks({"keys": [member]})
    assert why in str(caught.value)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "not a JWKS document"),
        ({}, "not a JWKS document"),
        ({"keys": {"kid": "x"}}, "not a JWKS document"),
        ({"keys": []}, "it is empty"),
        ("{}", "not a JWKS document"),
    ],
)
def test_bad_jwks_documents_raise_value_error(doc: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeySet.from_jwks(doc)


def test_jwks_never_leaks_key_material_in_messages() -> None:
    member = RSA.jwk(alg="HS256")
    keys = KeySet.from_jwks({"keys": [member, EC256.jwk()]})
    assert member["n"][:16] not in " ".join(keys.skipped)
    assert member["n"][:16] not in repr(keys)


def test_private_jwk_is_reduced_to_its_public_half() -> None:
    from jwt.algorithms import RSAAlgorithm

    private = json.loads(RSAAlgorithm.to_jwk(RSA.private_key)) | {"kid": "rsa-1"}
    del private["key_ops"]  # pyjwt marks a private JWK ["sign"], which we would (rightly) skip
    keys = KeySet.from_jwks({"keys": [private]})
    assert verify(RSA.sign(claims()), keys, RULE, NOW)["sub"] == "alice"


def test_duplicate_kid_keeps_the_first() -> None:
    keys = KeySet.from_jwks({"keys": [RSA.jwk(), RSA_OTHER.jwk()]})
    assert len(keys) == 1
    assert "duplicate" in keys.skipped[0]
    assert reason_of(RSA.sign(claims()), keys=keys) is None
    assert reason_of(RSA_OTHER.sign(claims()), keys=keys) == "bad_signature"


def _certificate(pair: KeyPair) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(pair.private_key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .sign(pair.private_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("pem", "ok"),
    [
        pytest.param(RSA.public_pem(), True, id="spki-rsa"),
        pytest.param(ED.public_pem(), False, id="spki-ed25519-other-key"),
        pytest.param(
            RSA.private_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
            True,
            id="pkcs1-rsa",
        ),
        pytest.param(_certificate(RSA), True, id="certificate"),
    ],
)
def test_pem_forms(pem: bytes, ok: bool) -> None:
    keys = KeySet.from_pem(pem)
    assert (reason_of(RSA.sign(claims()), keys=keys) is None) == ok


@pytest.mark.parametrize(
    ("pem", "message"),
    [
        (b"", "no PEM block"),
        (b"hello", "no PEM block"),
        (
            RSA.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            "private key",
        ),
        (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "PEM block 0"),
        (SMALL_RSA.public_pem(), "1024 bits"),
        (b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", "unsupported PEM block"),
    ],
)
def test_bad_pem_raises_value_error(pem: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeySet.from_pem(pem)
