"""Pushed configs and bundles, checked as a gateway would: every problem, by path."""

from __future__ import annotations

import gzip
import io
import tarfile
from typing import Any

import pytest

from gateway.configservice.validate import check_bundle, check_config

ROUTES = [{"name": "r", "match": {"path_prefix": "/"}, "cluster": "c"}]
CLUSTERS = [{"name": "c", "endpoints": ["127.0.0.1:9001"]}]
BOOTSTRAP = "set by the gateway's bootstrap file, not by the config service"


def test_valid_config_compiles_for_the_urls_service() -> None:
    checked = check_config("orders", {"routes": ROUTES, "clusters": CLUSTERS})
    assert checked.problems == ()
    assert checked.snapshot is not None
    assert checked.snapshot.service == "orders"


@pytest.mark.parametrize(
    ("document", "problems"),
    [
        pytest.param(None, ["(document): the document is empty"], id="empty"),
        pytest.param([1], ["(document): expected a mapping at the top level, got a list"], id="list"),
        pytest.param(
            {"service": "x", "listen": "1.2.3.4:1", "admin": "1.2.3.4:2", "config_service": {}, "tls": {}, "mesh": {},
             "routes": ROUTES, "clusters": CLUSTERS},
            [f"{key}: {BOOTSTRAP}" for key in ("service", "listen", "admin", "config_service", "tls", "mesh")],
            id="bootstrap-only",
        ),
        pytest.param(
            {"routes": ROUTES, "clusters": CLUSTERS, "authz": {"bundle": "./policy"}},
            ["authz.bundle: './policy' is not a bundle name: authz.bundle names a bundle stored in the config service "
             "(PUT /v1/bundles/{name}), not a file path"],
            id="bundle-path",
        ),
        pytest.param(
            # Accepted here once, then refused by every gateway (its bundle file would be cache_dir/bundles/...).
            {"routes": ROUTES, "clusters": CLUSTERS, "authz": {"bundle": ".."}},
            ["authz.bundle: '..' is not a bundle name: authz.bundle names a bundle stored in the config service "
             "(PUT /v1/bundles/{name}), not a file path"],
            id="bundle-dot-dot",
        ),
    ],
)  # fmt: skip
def test_rejected_configs(document: Any, problems: list[str]) -> None:
    checked = check_config("orders", document)
    assert checked.snapshot is None
    assert [str(p) for p in checked.problems] == problems


def test_compiler_problems_come_with_bootstrap_ones() -> None:
    checked = check_config("orders", {"listen": "x", "routes": ROUTES})
    assert str(checked.problems[0]) == f"listen: {BOOTSTRAP}"
    assert "clusters: required" in [str(p) for p in checked.problems]


def test_named_bundles() -> None:
    authz = {"bundle": "main", "shadow": {"bundle": "next"}}
    checked = check_config("orders", {"routes": ROUTES, "clusters": CLUSTERS, "authz": authz})
    assert checked.bundles == (("authz.bundle", "main"), ("authz.shadow.bundle", "next"))
    opa = {"engine": "opa", "opa_url": "http://127.0.0.1:8181"}
    assert check_config("orders", {"routes": ROUTES, "clusters": CLUSTERS, "authz": opa}).bundles == ()


def tarball(files: dict[str, str]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue())


def test_bundle_checks() -> None:
    bundle, problems = check_bundle(tarball({"p.rego": "package p\n\nallow := true\n"}))
    assert problems == []
    assert bundle is not None
    bundle, problems = check_bundle(tarball({"p.rego": "package p\n\nallow if {\n"}))
    assert bundle is None
    assert problems[0].path == "p.rego"
    assert "parse error" in problems[0].message
    bundle, problems = check_bundle(tarball({"README": "no policy"}))
    assert [str(p) for p in problems] == [
        "(bundle): bundle has no .rego policy files (files ending in _test.rego do not count)"
    ]
    _, problems = check_bundle(b"junk")
    assert [str(p) for p in problems] == ["(bundle): not a readable .tar.gz bundle: not a gzip file"]
