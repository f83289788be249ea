"""VerifiedTokens: reuse only with the same key set, time claims checked at every use, bounded."""

from __future__ import annotations

import pytest

from policy.jwt import JwtRule, KeySet, Unauthenticated, verify
from policy.token_cache import VerifiedTokens
from tests.jwt_tokens import KeyPair, jwks

NOW = 1_800_000_000.0
RULE = JwtRule("https://idp", frozenset({"shop"}), frozenset({"ES256"}), leeway=0.0)
KEY = KeyPair.ec("k1")


def token(**claims: object) -> str:
    return KEY.sign({"iss": "https://idp", "aud": "shop", "sub": "alice", "exp": NOW + 60, **claims})


def test_a_remembered_token_is_answered_for_the_same_key_set_only() -> None:
    keys = KeySet.from_jwks(jwks(KEY))
    cache = VerifiedTokens()
    raw = token()
    claims = verify(raw, keys, RULE, NOW)
    cache.remember(raw, "k1", keys, claims)
    assert cache.kid_of(raw) == ("k1", keys)
    assert cache.claims(raw, keys, RULE, NOW + 1) is claims
    rotated = KeySet.from_jwks(jwks(KEY))  # same keys, new set: as after a JWKS refresh
    assert cache.claims(raw, rotated, RULE, NOW + 1) is None


def test_expiry_is_checked_at_every_use() -> None:
    keys = KeySet.from_jwks(jwks(KEY))
    cache = VerifiedTokens()
    raw = token()
    cache.remember(raw, "k1", keys, verify(raw, keys, RULE, NOW))
    with pytest.raises(Unauthenticated) as info:
        cache.claims(raw, keys, RULE, NOW + 61)
    assert info.value.reason == "expired"


def test_bounded_in_entries_and_token_size() -> None:
    keys = KeySet.from_jwks(jwks(KEY))
    cache = VerifiedTokens(max_entries=2, max_token_bytes=1000)
    first, second, third = token(jti="1"), token(jti="2"), token(jti="3")
    for raw in (first, second, third):
        cache.remember(raw, "k1", keys, verify(raw, keys, RULE, NOW))
    assert cache.kid_of(first) is None  # the oldest went first
    assert len(cache) == 2
    large = token(pad="x" * 1000)
    cache.remember(large, "k1", keys, verify(large, keys, RULE, NOW))
    assert cache.kid_of(large) is None
