"""The ``mesh`` section and clusters' ``mesh_identity``: what compiles to what, and every rejected shape with its
exact message."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from gateway.config.bootstrap import merge
from gateway.config.compile import compile_document
from gateway.config.errors import ConfigError
from gateway.config.snapshot import MeshSettings

from .sample import edited

C = "clusters[0]"
SERVICE = {"config_service": {"url": "http://127.0.0.1:7000", "token_file": "gw.token"}}
PAYMENTS = "spiffe://meshgate.local/service/payments"


def mesh(**section: object) -> dict[str, object]:
    return {**SERVICE, "mesh": section}


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({}, MeshSettings("strict", "meshgate.local")),
        ({"mtls": "permissive"}, MeshSettings("permissive", "meshgate.local")),
        ({"mtls": "disabled", "trust_domain": "prod.example"}, MeshSettings("disabled", "prod.example")),
    ],
)
def test_mesh_section(section: dict[str, object], expected: MeshSettings) -> None:
    assert compile_document(edited(mesh(**section))).mesh == expected


def test_no_mesh_by_default() -> None:
    snapshot = compile_document(edited({}))
    assert snapshot.mesh is None
    assert snapshot.clusters["orders"].mesh_identity is None


def test_mesh_identity() -> None:
    snapshot = compile_document(edited({**mesh(), f"{C}.mesh_identity": PAYMENTS}))
    assert snapshot.clusters["orders"].mesh_identity == PAYMENTS
    assert snapshot.clusters["orders"].tls is None


def test_mesh_identity_in_another_trust_domain() -> None:
    document = edited({**mesh(trust_domain="prod.example"), f"{C}.mesh_identity": "spiffe://prod.example/service/x"})
    assert compile_document(document).clusters["orders"].mesh_identity == "spiffe://prod.example/service/x"


def test_mesh_is_bootstrap_only_and_mesh_identity_may_be_pushed() -> None:
    with pytest.raises(ConfigError) as info:
        merge({"service": "orders"}, {"mesh": {}})
    assert str(info.value) == "mesh: set by the gateway's bootstrap file, not by the config service"
    pushed = {"clusters": [{"name": "orders", "endpoints": ["127.0.0.1:1"], "mesh_identity": PAYMENTS}]}
    merged = merge(edited(mesh()), pushed)
    assert compile_document(merged).clusters["orders"].mesh_identity == PAYMENTS


def case(edits: Mapping[str, object], *lines: str) -> object:
    return pytest.param(edits, "\n".join(lines), id=lines[0])


REJECTED = [
    case({"mesh": {}}, "mesh: needs a config_service section (the mesh certificate comes from it)"),
    case(
        {**mesh(), "tls": {"cert_file": "a.pem", "key_file": "a.key"}},
        "mesh: cannot be used with a tls section (one listener, one identity)",
    ),
    case({**SERVICE, "mesh": "strict"}, 'mesh: expected a mapping, got "strict"'),
    case(mesh(mtls="STRICT"), 'mesh.mtls: unknown mode "STRICT" (one of strict, permissive, disabled)'),
    case(mesh(mtls="on"), 'mesh.mtls: unknown mode "on" (one of strict, permissive, disabled)'),
    case(
        mesh(trust_domain="mesh_local"),  # SPIFFE allows "_", the CA signs DNS names only: refused on both sides
        'mesh.trust_domain: invalid trust domain "mesh_local" '
        '(a DNS-like name: lower-case letters, digits, "-", dot-separated)',
    ),
    case(
        mesh(trust_domain="Mesh Local"),
        'mesh.trust_domain: invalid trust domain "Mesh Local" '
        '(a DNS-like name: lower-case letters, digits, "-", dot-separated)',
    ),
    case(mesh(mode="strict"), "mesh.mode: unknown key"),
    case(
        {f"{C}.mesh_identity": PAYMENTS},
        "clusters[0].mesh_identity: needs a top-level mesh section (the gateway's own mesh certificate)",
    ),
    case(
        {**mesh(), f"{C}.mesh_identity": "spiffe://other.domain/service/payments"},
        'clusters[0].mesh_identity: trust domain "other.domain" is not the mesh\'s ("meshgate.local")',
    ),
    case(
        {**mesh(), f"{C}.mesh_identity": "payments"},
        'clusters[0].mesh_identity: invalid mesh identity "payments" (spiffe://<trust domain>/service/<service name>)',
    ),
    case(
        {**mesh(), f"{C}.mesh_identity": "spiffe://meshgate.local/ns/default/sa/payments"},
        'clusters[0].mesh_identity: invalid mesh identity "spiffe://meshgate.local/ns/default/sa/payments" '
        "(spiffe://<trust domain>/service/<service name>)",
    ),
    case({**mesh(), f"{C}.mesh_identity": 5}, "clusters[0].mesh_identity: expected a string, got 5"),
    case(
        {**mesh(), f"{C}.mesh_identity": PAYMENTS, f"{C}.tls": {}},
        "clusters[0].mesh_identity: cannot be used with tls (mesh mTLS brings its own certificates)",
    ),
    # A broken mesh section is reported once; the identity is not judged against a domain nobody could read.
    case(
        {**mesh(mtls="x"), f"{C}.mesh_identity": PAYMENTS},
        'mesh.mtls: unknown mode "x" (one of strict, permissive, disabled)',
    ),
]


@pytest.mark.parametrize(("edits", "expected"), REJECTED)
def test_rejected(edits: Mapping[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_document(edited(edits))
    assert str(info.value) == expected
