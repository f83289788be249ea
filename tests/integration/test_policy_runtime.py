"""Policies: building decision paths from real bundles, the cache key rules, reuse across reloads, bundle reloads."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from gateway.config.compile import compile_document
from gateway.config.errors import ConfigError
from gateway.config.snapshot import Snapshot
from gateway.policy_runtime import Policies, check_policies

HTTP = ("attributes", "request", "http")
HEADER_POLICY = """package meshgate.authz

import rego.v1

http_request := input.attributes.request.http

allow if {
	http_request.method == "GET"
	http_request.headers["x-tenant"] == "acme"
}
"""
REQUEST_ID_POLICY = """package meshgate.authz

import rego.v1

allow if input.attributes.request.http.id != ""
"""


def bundle(directory: Path, text: str, revision: str = "r1") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ".manifest").write_text(f'{{"revision": "{revision}"}}')
    (directory / "authz.rego").write_text(text)
    return directory


def snapshot(bundle_dir: Path, **authz: Any) -> Snapshot:
    return compile_document(
        {
            "service": "s",
            "routes": [{"name": "r", "cluster": "c"}],
            "clusters": [{"name": "c", "endpoints": ["127.0.0.1:9"]}],
            "authz": {"bundle": str(bundle_dir), **authz},
        }
    )


async def test_automatic_key_is_what_the_policy_reads(tmp_path: Path) -> None:
    policies = Policies()
    try:
        runtime = await policies.apply(snapshot(bundle(tmp_path / "b", HEADER_POLICY), cache={}))
        assert runtime.authz is not None
        assert runtime.authz.primary.cache is not None
        assert set(runtime.authz.primary.key_paths) == {(*HTTP, "method"), (*HTTP, "headers", "x-tenant")}
    finally:
        await policies.close()


def test_configured_key_that_misses_a_read_is_refused(tmp_path: Path) -> None:
    config = snapshot(bundle(tmp_path / "b", HEADER_POLICY), cache={"key": ["method", "principal"]})
    with pytest.raises(ConfigError) as info:
        check_policies(config)
    assert str(info.value) == (
        "authz.cache.key: the policy reads input.attributes.request.http.headers.x-tenant, which the key leaves out "
        "(two requests differing there would share a decision); add it, or drop `key` to let meshgate key on "
        "exactly what the policy reads"
    )
    check_policies(snapshot(tmp_path / "b", cache={"key": ["method", "header:X-Tenant"]}))  # covered: no error


async def test_policy_reading_the_request_id_is_not_cached(tmp_path: Path) -> None:
    policies = Policies()
    try:
        runtime = await policies.apply(snapshot(bundle(tmp_path / "b", REQUEST_ID_POLICY), cache={}))
        assert runtime.authz is not None
        assert runtime.authz.primary.cache is None
    finally:
        await policies.close()


def test_check_names_the_bundle_problem(tmp_path: Path) -> None:
    broken = bundle(tmp_path / "b", "package meshgate.authz\n\nallow if http.send({}).status_code == 200\n")
    with pytest.raises(ConfigError) as info:
        check_policies(snapshot(broken))
    (problem,) = info.value.problems
    assert problem.path == "authz.bundle"
    assert "http.send" in problem.message


async def test_unchanged_settings_reuse_the_decision_path_and_its_cache(tmp_path: Path) -> None:
    policies = Policies()
    try:
        first = await policies.apply(snapshot(bundle(tmp_path / "b", HEADER_POLICY), cache={}))
        again = await policies.apply(dataclasses.replace(snapshot(tmp_path / "b", cache={}), hash="other"))
        assert first.authz is not None
        assert again.authz is not None
        assert again.authz.primary is first.authz.primary
        changed = await policies.apply(snapshot(tmp_path / "b", cache={"ttl": "9s"}))
        assert changed.authz is not None
        assert changed.authz.primary is not first.authz.primary
    finally:
        await policies.close()


async def test_a_changed_bundle_replaces_the_path_and_a_broken_one_keeps_it(tmp_path: Path) -> None:
    policies = Policies(watch_interval=0.05)
    try:
        runtime = await policies.apply(snapshot(bundle(tmp_path / "b", HEADER_POLICY, "r1"), cache={}))
        authz = runtime.authz
        assert authz is not None
        bundle(tmp_path / "b", HEADER_POLICY.replace("acme", "globex"), "r2")
        for _ in range(100):
            if authz.primary.engine.revision == "r2":
                break
            await asyncio.sleep(0.02)
        assert authz.primary.engine.revision == "r2"
        good = authz.primary
        (tmp_path / "b" / "authz.rego").write_text("package meshgate.authz\nallow if {\n")
        await asyncio.sleep(0.3)
        assert authz.primary.engine is good.engine  # the broken files were noticed and refused
    finally:
        await policies.close()


async def test_a_bad_config_leaves_the_current_runtime(tmp_path: Path) -> None:
    policies = Policies()
    try:
        good = await policies.apply(snapshot(bundle(tmp_path / "b", HEADER_POLICY)))
        with pytest.raises(ConfigError):
            await policies.apply(snapshot(bundle(tmp_path / "bad", "package x\nallow if {\n")))
        assert policies.current is good
    finally:
        await policies.close()
