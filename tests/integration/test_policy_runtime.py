"""Policies: building decision paths from real bundles, the cache key rules, reuse across reloads, bundle reloads."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from gateway.config.compile import compile_document
from gateway.config.errors import ConfigError
from gateway.config.policy import OPA_DEFAULT_CACHE_KEY
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


async def test_an_opa_shadow_of_an_embedded_primary_gets_the_default_key(tmp_path: Path) -> None:
    # Both paths share `authz.cache`; with no `key` the embedded one keys on its reads and the OPA one on the
    # documented default (this used to trip an assertion when the config was applied).
    policies = Policies()
    try:
        shadow = {"engine": "opa", "opa_url": "http://127.0.0.1:9"}
        runtime = await policies.apply(snapshot(bundle(tmp_path / "b", HEADER_POLICY), cache={}, shadow=shadow))
        assert runtime.authz is not None
        assert runtime.authz.shadow is not None
        assert set(runtime.authz.primary.key_paths) == {(*HTTP, "method"), (*HTTP, "headers", "x-tenant")}
        assert runtime.authz.shadow.key_paths == OPA_DEFAULT_CACHE_KEY
    finally:
        await policies.close()


DESTINATION_POLICY = """package meshgate.authz

import rego.v1

allow if input.attributes.destination.address.socketAddress.address == "127.0.0.1"
"""
ALL_HEADERS_POLICY = """package meshgate.authz

import rego.v1

allow if {
	some name, _ in input.attributes.request.http.headers
	startswith(name, "x-ok")
}
"""
SERVICE_POLICY = """package meshgate.authz

import rego.v1

allow if input.meshgate.service == "s"
"""


async def test_automatic_key_holds_the_destination(tmp_path: Path) -> None:
    # A listener on 0.0.0.0 sees several local addresses: a decision for one must not answer for another.
    policies = Policies()
    try:
        runtime = await policies.apply(snapshot(bundle(tmp_path / "b", DESTINATION_POLICY), cache={}))
        assert runtime.authz is not None
        assert runtime.authz.primary.key_paths == (
            ("attributes", "destination", "address", "socketAddress", "address"),
        )
    finally:
        await policies.close()


async def test_policy_reading_every_header_is_not_cached(tmp_path: Path) -> None:
    # The headers hold the x-request-id the gateway sets: every request would miss, as the docs say.
    policies = Policies()
    try:
        runtime = await policies.apply(snapshot(bundle(tmp_path / "b", ALL_HEADERS_POLICY), cache={}))
        assert runtime.authz is not None
        assert runtime.authz.primary.cache is None
    finally:
        await policies.close()


async def test_a_renamed_service_starts_a_fresh_cache(tmp_path: Path) -> None:
    # input.meshgate.service is left out of keys as a constant: a cache filled under another name must go.
    policies = Policies()
    try:
        first = await policies.apply(snapshot(bundle(tmp_path / "b", SERVICE_POLICY), cache={}))
        renamed = await policies.apply(dataclasses.replace(snapshot(tmp_path / "b", cache={}), service="other"))
        assert first.authz is not None
        assert renamed.authz is not None
        assert renamed.authz.primary is not first.authz.primary
    finally:
        await policies.close()


async def test_an_unexpected_reload_error_does_not_stop_the_watcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.policy_runtime as runtime_module

    real = runtime_module._build_path
    failures = []

    def flaky(*args: Any) -> Any:
        if not failures:
            failures.append(1)
            raise KeyError("engine bug")
        return real(*args)

    policies = Policies(watch_interval=0.05)
    try:
        runtime = await policies.apply(snapshot(bundle(tmp_path / "b", HEADER_POLICY, "r1"), cache={}))
        authz = runtime.authz
        assert authz is not None
        monkeypatch.setattr(runtime_module, "_build_path", flaky)
        bundle(tmp_path / "b", HEADER_POLICY, "r2")
        await asyncio.sleep(0.3)
        assert failures
        assert authz.primary.engine.revision == "r1"
        bundle(tmp_path / "b", HEADER_POLICY + "\n", "r3")  # the next change still loads
        for _ in range(100):
            if authz.primary.engine.revision == "r3":
                break
            await asyncio.sleep(0.02)
        assert authz.primary.engine.revision == "r3"
    finally:
        await policies.close()


async def test_claim_headers_are_stripped_in_both_spellings(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(_public_pem())
    config = compile_document(
        {
            "service": "s",
            "routes": [{"name": "r", "cluster": "c"}],
            "clusters": [{"name": "c", "endpoints": ["127.0.0.1:9"]}],
            "authn": {"jwt": {"key_file": str(key), "forward_claims": {"sub": "X-User-Id", "tier": "x-tier"}}},
        }
    )
    policies = Policies()
    try:
        runtime = await policies.apply(config)
        assert runtime.authn is not None
        assert runtime.authn.claim_headers == ("x-user-id", "x_user_id", "x-tier", "x_tier")
    finally:
        await policies.close()


def _public_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


async def test_close_closes_engines_still_in_their_retirement_grace(tmp_path: Path) -> None:
    def opa(url: str) -> Snapshot:
        return compile_document(
            {
                "service": "s",
                "routes": [{"name": "r", "cluster": "c"}],
                "clusters": [{"name": "c", "endpoints": ["127.0.0.1:9"]}],
                "authz": {"engine": "opa", "opa_url": url},
            }
        )

    policies = Policies()
    first = await policies.apply(opa("http://127.0.0.1:9"))
    assert first.authz is not None
    engine: Any = first.authz.primary.engine
    session = engine._client()  # as after a first decision
    await policies.apply(opa("http://127.0.0.1:10"))  # the first engine now waits out its grace period
    await policies.close()
    assert session.closed


async def test_policy_that_reads_the_clock_is_not_cached(tmp_path: Path) -> None:
    clock = "package meshgate.authz\n\nimport rego.v1\n\nallow if time.now_ns() < 4102444800000000000\n"
    policies = Policies()
    try:
        runtime = await policies.apply(snapshot(bundle(tmp_path / "b", clock), cache={}))
        assert runtime.authz is not None
        assert runtime.authz.primary.cache is None
    finally:
        await policies.close()
