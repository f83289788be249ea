"""The compose files drive the local demo unchanged but for host names (and OPA -> embedded): ``topology.py``."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from gateway.config.document import load_text
from gateway.demo.topology import COMPOSE, OPA_BUNDLE, embedded_authz, localize, localize_service


@pytest.mark.parametrize(
    ("value", "local"),
    [
        ("configservice:7000", "127.0.0.1:7000"),
        ("http://configservice:7000", "http://127.0.0.1:7000"),
        ("0.0.0.0:8081", "127.0.0.1:8081"),
        ("payments-b:9003", "127.0.0.1:9003"),
        ("http://idp:7777/.well-known/jwks.json", "http://127.0.0.1:7777/.well-known/jwks.json"),
        # Not addresses: route names, issuers, hosts without a port, longer names that contain a compose name.
        ("orders-read", "orders-read"),
        ("https://idp.meshgate.demo", "https://idp.meshgate.demo"),
        ("orders", "orders"),
        ("my-orders:8081", "my-orders:8081"),
        ("orders.internal:8081", "orders.internal:8081"),
    ],
)
def test_localize_rewrites_only_compose_addresses(value: str, local: str) -> None:
    assert localize(value) == local


def test_localize_walks_documents() -> None:
    document = {"clusters": [{"endpoints": ["127.0.0.1:9002", "payments-b:9003"], "weight": 3}], "on": True}
    local = {"clusters": [{"endpoints": ["127.0.0.1:9002", "127.0.0.1:9003"], "weight": 3}], "on": True}
    assert localize(document) == local


def test_opa_becomes_the_embedded_engine_on_the_bundle_opa_pulls() -> None:
    authz = {"engine": "opa", "opa_url": "http://opa:8181", "decision": "a/b", "timeout": "250ms", "on_error": "deny"}
    assert embedded_authz(authz) == {"engine": "embedded", "bundle": OPA_BUNDLE, "decision": "a/b", "on_error": "deny"}
    embedded = {"engine": "embedded", "bundle": "x", "cache": {"ttl": "5s"}}
    assert embedded_authz(embedded) == embedded


# What the demo changes in each seeded config, written out: anything else that differs is a bug in localize().
EXPECTED_CHANGES: dict[str, dict[str, Any]] = {
    "orders": {
        "rate_limit_service.redis": "127.0.0.1:6379",
        "authn.jwt.jwks_url": "http://127.0.0.1:7777/.well-known/jwks.json",
    },
    "payments": {
        "clusters.0.endpoints.1": "127.0.0.1:9003",
        "authn.jwt.jwks_url": "http://127.0.0.1:7777/.well-known/jwks.json",
        # No OPA server without Docker: the embedded engine on the bundle OPA pulls, same decision and failure mode.
        "authz": {"engine": "embedded", "bundle": OPA_BUNDLE, "decision": "meshgate/authz/allow", "on_error": "deny"},
    },
}


@pytest.mark.parametrize("service", sorted(EXPECTED_CHANGES))
def test_the_demo_pushes_the_compose_configs_with_only_the_listed_changes(service: str) -> None:
    compose = load_text((COMPOSE / "seed" / "services" / f"{service}.yaml").read_text())
    assert isinstance(compose, dict)
    expected = copy.deepcopy(compose)
    for where, value in EXPECTED_CHANGES[service].items():
        *parents, last = where.split(".")
        node: Any = expected
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    assert localize_service(compose) == expected


def test_every_seeded_service_has_its_expected_changes_listed() -> None:
    assert {path.stem for path in (COMPOSE / "seed" / "services").glob("*.yaml")} == set(EXPECTED_CHANGES)
