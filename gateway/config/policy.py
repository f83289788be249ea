"""The ``authn`` and ``authz`` sections: JWT verification and the Rego decision paths, decoded and checked.

Pure, like the rest of the compiler: a bundle is not loaded here (``gateway/policy_runtime.py`` does that when a
config is applied, and ``meshgate check`` too), and relative file paths are resolved by the file source, which knows
the config file's directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from gateway.config.schema import (
    Fields,
    boolean,
    choice,
    duration,
    integer,
    items,
    mapping_of_any,
    matching,
    size,
    string,
)
from gateway.config.values import quote
from policy.cache import InputPath
from policy.jwt import JwtRule
from policy.settings import (
    ASYMMETRIC_ALGORITHMS,
    AuthnSettings,
    AuthzSettings,
    CacheSettings,
    EngineKind,
    EngineSettings,
    OnError,
)

__all__ = ["CACHE_KEY_NAMES", "OPA_DEFAULT_CACHE_KEY", "PolicySection", "compile_policy"]

AUTHN_KEYS = ("jwt",)
JWT_KEYS = (
    "issuer",
    "audiences",
    "jwks_url",
    "key_file",
    "algorithms",
    "leeway",
    "refresh",
    "forward_claims",
    "max_token_size",
)
AUTHZ_KEYS = ("engine", "bundle", "opa_url", "decision", "timeout", "on_error", "cache", "shadow", "decision_log")
SHADOW_KEYS = ("engine", "bundle", "opa_url", "decision", "timeout")
CACHE_KEYS = ("ttl", "max_entries", "key")
ENGINES: tuple[str, ...] = ("embedded", "opa", "none")
ON_ERROR: tuple[OnError, ...] = ("deny", "allow")
DEFAULT_DECISION = "meshgate/authz/allow"

# Names for the usual parts of the input in `authz.cache.key`; anything else is written as `input.a.b`.
_HTTP = ("attributes", "request", "http")
CACHE_KEY_NAMES: dict[str, InputPath] = {
    "principal": ("meshgate", "principal"),
    "route": ("meshgate", "route"),
    "method": (*_HTTP, "method"),
    "path": (*_HTTP, "path"),  # with the query string, as in the input
    "host": (*_HTTP, "host"),
    "source": ("attributes", "source"),
    "peer": ("attributes", "source", "principal"),  # the caller's verified mesh identity
}
# The mesh peer is in it: a remote policy may judge by the caller's identity, which no other part of the key shows.
DEFAULT_CACHE_KEY = ("principal", "peer", "method", "route", "path")
# What an `engine: opa` decision path keys on when `key` is not configured: OPA's policy is out of sight.
OPA_DEFAULT_CACHE_KEY: tuple[InputPath, ...] = tuple(CACHE_KEY_NAMES[name] for name in DEFAULT_CACHE_KEY)

_DECISION = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:/[A-Za-z_][A-Za-z0-9_]*)*")
_decision = matching(_DECISION, "decision path", 'a rule path like "meshgate/authz/allow"')
_HEADER = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_header = matching(_HEADER, "header name")
# Headers the upstream must be able to trust as the gateway's own; a claim may not be forwarded in them.
_RESERVED_HEADERS = frozenset(
    {"authorization", "host", "content-length", "transfer-encoding", "connection", "x-request-id", "traceparent"}
)
_INPUT_SEGMENT = re.compile(r"[A-Za-z0-9_:.-]+")


@dataclass(frozen=True, slots=True)
class PolicySection:
    authn: AuthnSettings | None = None
    authz: AuthzSettings | None = None


def compile_policy(top: Fields) -> PolicySection:
    return PolicySection(_authn(top), _authz(top))


def _authn(top: Fields) -> AuthnSettings | None:
    authn = top.section("authn", AUTHN_KEYS)
    if authn is None:
        return None
    fields = authn.section("jwt", JWT_KEYS)
    if fields is None:
        if not authn.has("jwt"):
            authn.problems.add(authn.at("jwt"), "required")
        return None
    mark = fields.problems.mark()
    issuer = fields.optional("issuer", string)
    audiences = _strings(fields, "audiences")
    source = fields.exactly_one(("jwks_url", "key_file"))
    jwks_url = _http_url(fields, "jwks_url") if source == "jwks_url" else None
    key_file = fields.optional("key_file", string) if source == "key_file" else None
    algorithms = _algorithms(fields)
    leeway = fields.get("leeway", duration(positive=False), 30.0)
    refresh = fields.get("refresh", duration(positive=True), 300.0)
    forward = _forward_claims(fields)
    max_size = fields.get("max_token_size", size(positive=True), 8192)
    if fields.problems.since(mark) or source is None:
        return None
    rule = JwtRule(
        issuer=issuer,
        audiences=frozenset(audiences),
        algorithms=frozenset(algorithms),
        leeway=leeway,
        max_token_bytes=max_size,
    )
    return AuthnSettings(rule, jwks_url=jwks_url, key_file=key_file, refresh=refresh, forward_claims=forward)


def _strings(fields: Fields, key: str) -> list[str]:
    if not fields.has(key):
        return []
    values: list[str] = []
    for path, item in items(fields.raw[key], fields.at(key), fields.problems, empty="must not be empty"):
        text = string(item, path, fields.problems)
        if text is not None:
            values.append(text)
    return values


def _algorithms(fields: Fields) -> list[str]:
    if not fields.has("algorithms"):
        return ["RS256", "ES256"]
    chosen: list[str] = []
    for path, item in items(
        fields.raw["algorithms"], fields.at("algorithms"), fields.problems, empty="must not be empty"
    ):
        name = string(item, path, fields.problems)
        if name is None:
            continue
        if name.lower() == "none":
            fields.problems.add(path, '"none" is not a signature algorithm and cannot be allowed')
        elif name.upper().startswith("HS"):
            # A symmetric key would be a shared secret in every sidecar; with public keys it enables alg confusion.
            fields.problems.add(
                path, f"{quote(name)}: symmetric (HMAC) algorithms are not supported; use RS*, PS*, ES* or EdDSA"
            )
        elif name not in ASYMMETRIC_ALGORITHMS:
            fields.problems.add(path, f"unknown algorithm {quote(name)} (one of {', '.join(ASYMMETRIC_ALGORITHMS)})")
        else:
            chosen.append(name)
    return chosen


def _forward_claims(fields: Fields) -> tuple[tuple[str, str], ...]:
    raw = fields.optional("forward_claims", mapping_of_any)
    if raw is None:
        return ()
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    base = fields.at("forward_claims")
    for claim, header in raw.items():
        path = f"{base}.{claim}"
        name = _header(header, path, fields.problems)
        if not isinstance(claim, str) or not claim or name is None:
            continue
        lowered = name.lower()
        if lowered in _RESERVED_HEADERS:
            fields.problems.add(path, f"{quote(name)} is set by the gateway itself; choose another header")
        elif lowered in seen:
            fields.problems.add(path, f"header {quote(name)} is already used by another claim")
        else:
            seen.add(lowered)
            pairs.append((claim, lowered))
    return tuple(pairs)


def _http_url(fields: Fields, key: str) -> str | None:
    value = fields.required(key, string)
    if value is None:
        return None
    parts = urlsplit(value)
    path = fields.at(key)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        fields.problems.add(path, f'expected an http:// or https:// URL, got "{value}"')
        return None
    if parts.username is not None or parts.password is not None:
        fields.problems.add(path, "must not carry credentials (it is shown by /config and logged)")
        return None
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        fields.problems.add(path, f'bad port in "{value}"')
        return None
    return value


def _authz(top: Fields) -> AuthzSettings | None:
    fields = top.section("authz", AUTHZ_KEYS)
    if fields is None:
        return None
    mark = fields.problems.mark()
    primary = _engine(fields)
    on_error: OnError = fields.get("on_error", choice(ON_ERROR, "value"), "deny")
    cache = _cache(fields)
    shadow = None
    shadow_fields = fields.section("shadow", SHADOW_KEYS)
    if shadow_fields is not None:
        shadow = _engine(shadow_fields)
        if shadow is None and not shadow_fields.problems.since(mark):
            shadow_fields.problems.add(
                shadow_fields.at("engine"), 'must be embedded or opa (a shadow of "none" decides nothing)'
            )
    decision_log = fields.get("decision_log", boolean, True)
    if primary is None or fields.problems.since(mark):
        return None
    return AuthzSettings(primary, on_error=on_error, cache=cache, shadow=shadow, decision_log=decision_log)


def _engine(fields: Fields) -> EngineSettings | None:
    """One decision path (``authz`` itself or ``authz.shadow``); ``None`` for ``engine: none`` or on problems."""
    mark = fields.problems.mark()
    kind = fields.optional("engine", choice(ENGINES, "engine")) if fields.has("engine") else "embedded"
    if kind is None:
        return None  # an unknown engine: which other keys it needs is anyone's guess
    decision = fields.get("decision", _decision, DEFAULT_DECISION)
    timeout = fields.get("timeout", duration(positive=True), 0.25)
    bundle = opa_url = None
    if kind == "embedded":
        bundle = fields.required("bundle", string)
        _not_for(fields, "opa_url", kind)
    elif kind == "opa":
        opa_url = _http_url(fields, "opa_url")
        _not_for(fields, "bundle", kind)
    else:
        for key in ("bundle", "opa_url", "decision", "timeout"):
            _not_for(fields, key, kind)
    if kind == "none" or fields.problems.since(mark):
        return None
    engine: EngineKind = "embedded" if kind == "embedded" else "opa"
    return EngineSettings(engine, decision, bundle=bundle, opa_url=opa_url and opa_url.rstrip("/"), timeout=timeout)


def _not_for(fields: Fields, key: str, kind: str) -> None:
    if fields.has(key):
        fields.problems.add(fields.at(key), f'not used with engine "{kind}"')


def _cache(fields: Fields) -> CacheSettings | None:
    if not fields.has("cache"):
        return None
    if fields.raw["cache"] is False:
        return None  # `cache: false` spells out the default
    section = fields.section("cache", CACHE_KEYS)
    if section is None:
        return None
    defaults = CacheSettings()
    ttl = section.get("ttl", duration(positive=True), defaults.ttl)
    max_entries = section.get("max_entries", integer(1, 10_000_000), defaults.max_entries)
    # No key stays None: the runtime picks per engine (an embedded policy's own reads, else OPA_DEFAULT_CACHE_KEY),
    # since the primary and the shadow may be different engines sharing these settings.
    return CacheSettings(ttl=ttl, max_entries=max_entries, key=_cache_key(section))


def _cache_key(section: Fields) -> tuple[InputPath, ...] | None:
    if not section.has("key"):
        return None
    paths: list[InputPath] = []
    listed = items(section.raw["key"], section.at("key"), section.problems, empty="must not be empty")
    for path, item in listed:
        text = string(item, path, section.problems)
        if text is None:
            continue
        resolved = _key_path(text)
        if resolved is None:
            names = ", ".join([*CACHE_KEY_NAMES, "header:<name>", "input.<path>"])
            section.problems.add(path, f"unknown cache key part {quote(text)} (one of {names})")
        else:
            paths.append(resolved)
    return tuple(paths)


def _key_path(text: str) -> InputPath | None:
    if text in CACHE_KEY_NAMES:
        return CACHE_KEY_NAMES[text]
    if text.startswith("header:") and _HEADER.fullmatch(text[7:]):
        return (*_HTTP, "headers", text[7:].lower())
    if text.startswith("input."):
        parts = tuple(text[6:].split("."))
        if all(_INPUT_SEGMENT.fullmatch(part) for part in parts):
            return parts
    return None
