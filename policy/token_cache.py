"""Verified tokens, remembered: a token seen before skips parsing and the signature check (Envoy's ``jwt_cache``).

A client sends the same access token with every request until it expires, and verifying one is the most expensive
step of a request that carries one (bench/RESULTS.md: JWT authn doubled meshgate's CPU per request, mostly pyjwt's
base64 checks and the RSA verify). An entry is used only with the very ``KeySet`` it was verified against: a JWKS
refresh builds a new set, so after a rotation every token is verified again. The time-dependent claims (``exp``,
``nbf``, ``iat``) are checked again on every use, so an expired token is refused even while cached. A change of the
``authn`` settings comes with a new cache (one per ``AuthnRuntime``). Failures are never cached.

Pure: the clock is passed in.
"""

from __future__ import annotations

from typing import Any

from policy.jwt import JwtRule, KeySet, check_claims

__all__ = ["VerifiedTokens"]


class VerifiedTokens:
    """At most ``max_entries`` tokens (oldest out first), each at most ``max_token_bytes`` long."""

    def __init__(self, max_entries: int = 4096, max_token_bytes: int = 4096) -> None:
        self._max_entries = max_entries
        self._max_token_bytes = max_token_bytes  # a few large tokens must not pin much memory
        self._entries: dict[str, tuple[str | None, KeySet, dict[str, Any]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def kid_of(self, token: str) -> tuple[str | None, KeySet] | None:
        """The kid and key set ``token`` was verified with, if it is cached."""
        entry = self._entries.get(token)
        return None if entry is None else (entry[0], entry[1])

    def claims(self, token: str, keys: KeySet, rule: JwtRule, now: float) -> dict[str, Any] | None:
        """The cached claims if ``token`` was verified against ``keys``, with its time claims valid at ``now``
        (raises ``Unauthenticated`` as ``verify`` would); ``None`` when it must be verified afresh."""
        entry = self._entries.get(token)
        if entry is None or entry[1] is not keys:
            return None
        check_claims(entry[2], rule, now)
        return entry[2]

    def remember(self, token: str, kid: str | None, keys: KeySet, claims: dict[str, Any]) -> None:
        if len(token) > self._max_token_bytes:
            return
        if len(self._entries) >= self._max_entries:
            del self._entries[next(iter(self._entries))]  # insertion order: the oldest entry
        self._entries[token] = (kid, keys, claims)
