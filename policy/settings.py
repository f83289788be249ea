"""The policy settings a compiled gateway config carries: frozen data, decoded and checked by ``gateway/config``.

They live here, not in the gateway, because the policy runtime is built from them and ``policy`` may not import
``gateway``. Durations are float seconds; paths are already resolved against the config file's directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from policy.jwt import ASYMMETRIC_ALGORITHMS, JwtRule

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "AuthnSettings",
    "AuthzSettings",
    "CacheSettings",
    "EngineKind",
    "EngineSettings",
    "OnError",
]

EngineKind = Literal["embedded", "opa"]
OnError = Literal["deny", "allow"]


@dataclass(frozen=True, slots=True)
class AuthnSettings:
    """``authn.jwt``: how bearer tokens are verified and which claims the upstream sees as headers."""

    rule: JwtRule
    jwks_url: str | None = None  # exactly one of jwks_url / key_file is set
    key_file: str | None = None
    refresh: float = 300.0  # seconds between JWKS refreshes (an unknown kid refetches sooner, rate-limited)
    forward_claims: tuple[tuple[str, str], ...] = ()  # (claim, lower-case header name)


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """One decision path: which engine, asked which rule."""

    engine: EngineKind
    decision: str  # slash path of the rule, e.g. "meshgate/authz/allow"
    bundle: str | None = None  # embedded: directory or .tar.gz
    opa_url: str | None = None  # opa: base URL of the OPA server
    timeout: float = 0.25


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The decision cache. ``key`` lists input paths; ``None`` means "exactly what the policy reads" (embedded)."""

    ttl: float = 5.0
    max_entries: int = 10_000
    key: tuple[tuple[str, ...], ...] | None = None


@dataclass(frozen=True, slots=True)
class AuthzSettings:
    primary: EngineSettings
    on_error: OnError = "deny"
    cache: CacheSettings | None = None
    shadow: EngineSettings | None = None  # evaluated and logged on every request, never enforced
    decision_log: bool = True
