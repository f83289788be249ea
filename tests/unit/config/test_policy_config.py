"""The authn and authz sections: what they compile to, and every rejection with its exact message."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from gateway.config.compile import compile_document
from gateway.config.errors import ConfigError
from gateway.config.policy import OPA_DEFAULT_CACHE_KEY
from policy.jwt import JwtRule
from policy.settings import AuthnSettings, AuthzSettings, CacheSettings, EngineSettings

from .sample import edited

JWKS = "http://127.0.0.1:7777/jwks.json"
ALGS = "RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, ES512, EdDSA"
HTTP = ("attributes", "request", "http")


def test_contract_example() -> None:
    snapshot = compile_document(
        edited(
            {
                "authn.jwt": {
                    "issuer": "https://idp.example",
                    "audiences": ["orders"],
                    "jwks_url": JWKS,
                    "algorithms": ["RS256", "ES256"],
                },
                "authz": {
                    "engine": "embedded",
                    "bundle": "./policy/rego",
                    "decision": "meshgate/authz/allow",
                    "timeout": "250ms",
                    "on_error": "deny",
                    "cache": {"ttl": "5s", "max_entries": 10000},
                },
            }
        )
    )
    rule = JwtRule("https://idp.example", frozenset({"orders"}), frozenset({"RS256", "ES256"}))
    assert snapshot.authn == AuthnSettings(rule, jwks_url=JWKS)
    assert snapshot.authz == AuthzSettings(
        EngineSettings("embedded", "meshgate/authz/allow", bundle="./policy/rego", timeout=0.25),
        cache=CacheSettings(ttl=5.0, max_entries=10000, key=None),
    )
    assert snapshot.routes[0].auth == "required"


def test_defaults_and_optional_parts() -> None:
    snapshot = compile_document(
        edited(
            {
                "authn.jwt": {
                    "key_file": "keys/idp.pem",
                    "leeway": "0s",
                    "refresh": "1m",
                    "forward_claims": {"sub": "X-User", "roles": "x-roles"},
                    "max_token_size": "4KiB",
                },
                "authz": {
                    "engine": "opa",
                    "opa_url": "http://127.0.0.1:8181/",
                    "cache": {"key": ["principal", "method", "header:X-Tenant", "input.meshgate.route"]},
                    "shadow": {"bundle": "./next"},
                    "decision_log": False,
                },
            }
        )
    )
    assert snapshot.authn is not None
    assert snapshot.authn.rule.algorithms == frozenset({"RS256", "ES256"})
    assert (snapshot.authn.rule.leeway, snapshot.authn.rule.max_token_bytes) == (0.0, 4096)
    assert snapshot.authn.forward_claims == (("sub", "x-user"), ("roles", "x-roles"))
    assert snapshot.authz is not None
    assert snapshot.authz.primary == EngineSettings("opa", "meshgate/authz/allow", opa_url="http://127.0.0.1:8181")
    assert snapshot.authz.shadow == EngineSettings("embedded", "meshgate/authz/allow", bundle="./next")
    assert snapshot.authz.cache is not None
    assert snapshot.authz.cache.key == (
        ("meshgate", "principal"),
        (*HTTP, "method"),
        (*HTTP, "headers", "x-tenant"),
        ("meshgate", "route"),
    )
    assert not snapshot.authz.decision_log


def test_opa_cache_without_key_gets_the_documented_default() -> None:
    snapshot = compile_document(edited({"authz": {"engine": "opa", "opa_url": "http://o:8181", "cache": {}}}))
    assert snapshot.authz is not None
    assert snapshot.authz.cache is not None
    # Left to the runtime, per engine: an embedded shadow of an OPA primary still keys on its own reads.
    assert snapshot.authz.cache.key is None
    peer = ("attributes", "source", "principal")  # the verified mesh identity of the caller
    default = (("meshgate", "principal"), peer, (*HTTP, "method"), ("meshgate", "route"), (*HTTP, "path"))
    assert default == OPA_DEFAULT_CACHE_KEY


@pytest.mark.parametrize(
    ("edits", "auth"),
    [
        ({}, "none"),  # no policy at all
        ({"authz": {"bundle": "b"}}, "optional"),  # authz alone still decides every route
        ({"authz": {"engine": "none"}}, "none"),
        ({"authn.jwt": {"jwks_url": JWKS}}, "required"),
        ({"authn.jwt": {"jwks_url": JWKS}, "routes[0].auth": "optional"}, "optional"),
        ({"authn.jwt": {"jwks_url": JWKS}, "routes[0].auth": "none"}, "none"),
    ],
)
def test_route_auth_default(edits: Mapping[str, object], auth: str) -> None:
    assert compile_document(edited(edits)).routes[0].auth == auth


def case(edits: Mapping[str, object], *lines: str) -> object:
    return pytest.param(edits, "\n".join(lines), id=lines[0])


REJECTED = [
    case({"authn": {}}, "authn.jwt: required"),
    case({"authn": {"oidc": {}}}, "authn.oidc: unknown key", "authn.jwt: required"),
    case({"authn.jwt": {}}, "authn.jwt: needs one of jwks_url, key_file"),
    case({"authn.jwt": {"jwks_url": JWKS, "key_file": "k"}}, "authn.jwt: use only one of jwks_url, key_file"),
    case(
        {"authn.jwt": {"jwks_url": "ftp://x"}}, 'authn.jwt.jwks_url: expected an http:// or https:// URL, got "ftp://x"'
    ),
    case(
        {"authn.jwt": {"jwks_url": "http://u:p@idp/jwks"}},
        "authn.jwt.jwks_url: must not carry credentials (it is shown by /config and logged)",
    ),
    case(
        {"authn.jwt": {"jwks_url": JWKS, "algorithms": ["none"]}},
        'authn.jwt.algorithms[0]: "none" is not a signature algorithm and cannot be allowed',
    ),
    case(
        {"authn.jwt": {"jwks_url": JWKS, "algorithms": ["RS256", "HS256"]}},
        'authn.jwt.algorithms[1]: "HS256": symmetric (HMAC) algorithms are not supported; use RS*, PS*, ES* or EdDSA',
    ),
    case(
        {"authn.jwt": {"jwks_url": JWKS, "algorithms": ["RS1"]}},
        f'authn.jwt.algorithms[0]: unknown algorithm "RS1" (one of {ALGS})',
    ),
    case({"authn.jwt": {"jwks_url": JWKS, "algorithms": []}}, "authn.jwt.algorithms: must not be empty"),
    case(
        {"authn.jwt": {"jwks_url": JWKS, "audiences": "orders"}}, 'authn.jwt.audiences: expected a list, got "orders"'
    ),
    case(
        {"authn.jwt": {"jwks_url": JWKS, "forward_claims": {"sub": "Authorization"}}},
        'authn.jwt.forward_claims.sub: "Authorization" is set by the gateway itself; choose another header',
    ),
    case(
        {"authn.jwt": {"jwks_url": JWKS, "forward_claims": {"sub": "x-u", "email": "X-U"}}},
        'authn.jwt.forward_claims.email: header "X-U" is already used by another claim',
    ),
    case(
        {"authn.jwt": {"jwks_url": JWKS, "forward_claims": {"sub": "bad header"}}},
        'authn.jwt.forward_claims.sub: invalid header name "bad header"',
    ),
    case({"authz": {}}, "authz.bundle: required"),
    case({"authz": {"engine": "wasm"}}, 'authz.engine: unknown engine "wasm" (one of embedded, opa, none)'),
    case({"authz": {"engine": "opa"}}, "authz.opa_url: required"),
    case(
        {"authz": {"engine": "opa", "opa_url": "http://o", "bundle": "b"}}, 'authz.bundle: not used with engine "opa"'
    ),
    case({"authz": {"bundle": "b", "opa_url": "http://o"}}, 'authz.opa_url: not used with engine "embedded"'),
    case({"authz": {"engine": "none", "bundle": "b"}}, 'authz.bundle: not used with engine "none"'),
    case(
        {"authz": {"bundle": "b", "decision": "data.x.allow"}},
        'authz.decision: invalid decision path "data.x.allow" (a rule path like "meshgate/authz/allow")',
    ),
    case({"authz": {"bundle": "b", "timeout": "0s"}}, "authz.timeout: must be > 0"),
    case({"authz": {"bundle": "b", "on_error": "open"}}, 'authz.on_error: unknown value "open" (one of deny, allow)'),
    case(
        {"authz": {"bundle": "b", "cache": {"ttl": "-1s"}}},
        'authz.cache.ttl: invalid duration "-1s" (use e.g. 250ms, 2s, 1m)',
    ),
    case(
        {"authz": {"bundle": "b", "cache": {"max_entries": 0}}},
        "authz.cache.max_entries: must be between 1 and 10000000",
    ),
    case(
        {"authz": {"bundle": "b", "cache": {"key": ["user"]}}},
        'authz.cache.key[0]: unknown cache key part "user" '
        "(one of principal, route, method, path, host, source, peer, header:<name>, input.<path>)",
    ),
    case(
        {"authz": {"bundle": "b", "shadow": {"engine": "none"}}},
        'authz.shadow.engine: must be embedded or opa (a shadow of "none" decides nothing)',
    ),
    case({"routes[0].auth": "required"}, 'routes[0].auth: "required" needs an authn section'),
]


@pytest.mark.parametrize(("edits", "expected"), REJECTED)
def test_rejected(edits: Mapping[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_document(edited(edits))
    assert str(info.value) == expected
