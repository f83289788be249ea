"""The compose files drive the local demo unchanged but for host names (and OPA -> embedded): ``topology.py``."""

from __future__ import annotations

from pathlib import Path
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


def _differences(a: Any, b: Any, at: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in a.keys() | b.keys() for d in _differences(a.get(key), b.get(key), f"{at}.{key}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for n, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{at}[{n}]")]
    return [] if a == b else [at]


@pytest.mark.parametrize("path", sorted((COMPOSE / "seed" / "services").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_demo_pushes_the_compose_configs_with_only_addresses_and_the_opa_engine_changed(path: Path) -> None:
    compose = load_text(path.read_text())
    assert isinstance(compose, dict)
    local = localize_service(compose)
    for where in _differences(compose, local):
        assert where.startswith(".authz") or ":" in str(_at(compose, where)), where
    if compose.get("authz", {}).get("engine") == "opa":
        assert local["authz"]["engine"] == "embedded"


def _at(document: Any, where: str) -> Any:
    for part in where.replace("[", ".[").split(".")[1:]:
        document = document[int(part[1:-1])] if part.startswith("[") else document[part]
    return document
