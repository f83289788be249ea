"""The ``config_service`` section, bootstrap (partial) compiles, and ``bootstrap + pushed``: merging, bundle names
pointed into the cache, relative paths. Pure: the few files are in ``tmp_path``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config.bootstrap import Bootstrap, compile_pushed, load_config, merge, read_token
from gateway.config.compile import compile_document
from gateway.config.errors import ConfigError
from gateway.config.snapshot import Address, ConfigService, Snapshot

from .sample import BASE, edited

BOOTSTRAP: dict[str, Any] = {
    "service": "orders",
    "listen": "127.0.0.1:8181",
    "config_service": {"url": "http://127.0.0.1:7000", "token_file": "./gw.token"},
}
PUSHED: dict[str, Any] = {"routes": BASE["routes"], "clusters": BASE["clusters"]}
GW_ID_HINT = '(use letters, digits, ".", "_", ":", "-"; at most 128)'


# --- the section --------------------------------------------------------------------------------------------------


def test_defaults() -> None:
    snapshot = compile_document(BOOTSTRAP, partial=True)
    assert snapshot.config_service == ConfigService("http://127.0.0.1:7000", "./gw.token")
    assert (snapshot.config_service.cache_dir, snapshot.config_service.gateway_id) == (".meshgate-cache", None)
    assert (snapshot.config_service.poll_wait, snapshot.config_service.bundle_refresh) == (30.0, 5.0)


def test_every_key() -> None:
    section = {
        "url": "https://cs.internal:7443/prefix/",
        "token_file": "/run/secrets/gw",
        "cache_dir": "/var/cache/meshgate",
        "gateway_id": "orders-a:1",
        "poll_wait": "45s",
        "bundle_refresh": "250ms",
    }
    snapshot = compile_document({**BOOTSTRAP, "config_service": section}, partial=True)
    assert snapshot.config_service == ConfigService(
        "https://cs.internal:7443/prefix", "/run/secrets/gw", "/var/cache/meshgate", "orders-a:1", 45.0, 0.25
    )


def case(section: Mapping[str, object], *lines: str) -> object:
    return pytest.param(section, "\n".join(lines), id=lines[0])


URL = {"token_file": "t"}


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        case({}, "config_service.url: required", "config_service.token_file: required"),
        case("http://x", 'config_service: expected a mapping, got "http://x"'),
        case({**URL, "url": 7000}, "config_service.url: expected a string, got 7000"),
        case(
            {**URL, "url": "127.0.0.1:7000"},
            'config_service.url: invalid URL "127.0.0.1:7000" (expected http://host:port or https://host:port)',
        ),
        case(
            {**URL, "url": "ftp://x"},
            'config_service.url: invalid URL "ftp://x" (expected http://host:port or https://host:port)',
        ),
        case({**URL, "url": "http://x:99999"}, 'config_service.url: invalid URL "http://x:99999"'),
        case(
            {**URL, "url": "http://u:p@x"},
            'config_service.url: invalid URL "http://u:p@x" (no query, fragment or credentials: use token_file)',
        ),
        case(
            {**URL, "url": "http://x/?a=1"},
            'config_service.url: invalid URL "http://x/?a=1" (no query, fragment or credentials: use token_file)',
        ),
        case({"url": "http://x", "token_file": ""}, "config_service.token_file: must not be empty"),
        case({"url": "http://x", "token_file": "t", "cache_dir": ""}, "config_service.cache_dir: must not be empty"),
        case(
            {"url": "http://x", "token_file": "t", "gateway_id": "a b"},
            f'config_service.gateway_id: invalid gateway id "a b" {GW_ID_HINT}',
        ),
        case(
            {"url": "http://x", "token_file": "t", "poll_wait": 30},
            'config_service.poll_wait: expected a duration string like "250ms" or "2s", got 30',
        ),
        case(
            {"url": "http://x", "token_file": "t", "poll_wait": "2m"},
            "config_service.poll_wait: must be <= the service's limit (1m)",
        ),
        case(
            {"url": "http://x", "token_file": "t", "bundle_refresh": "0s"}, "config_service.bundle_refresh: must be > 0"
        ),
        case(
            {"url": "http://x", "token_file": "t", "wait": "1s"},
            'config_service.wait: unknown key (did you mean "poll_wait"?)',
        ),
    ],
)
def test_rejected(section: object, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_document({**BOOTSTRAP, "config_service": section}, partial=True)
    assert str(info.value) == expected


# --- partial compiles -----------------------------------------------------------------------------------------------


def test_a_bootstrap_needs_no_routes_or_clusters() -> None:
    snapshot = compile_document(BOOTSTRAP, partial=True)
    assert (snapshot.routes, dict(snapshot.clusters), snapshot.listen) == ((), {}, Address("127.0.0.1", 8181))


def test_a_full_compile_still_needs_them() -> None:
    with pytest.raises(ConfigError) as info:
        compile_document(BOOTSTRAP)
    assert str(info.value) == "routes: required\nclusters: required"


def test_a_partial_compile_still_checks_what_is_there() -> None:
    with pytest.raises(ConfigError) as info:
        compile_document({**BOOTSTRAP, "routes": [{"name": "r"}], "limits": {"max_headers": 0}}, partial=True)
    assert str(info.value) == "routes[0]: needs one of cluster, split\nlimits.max_headers: must be >= 1"


# --- bootstrap + pushed ---------------------------------------------------------------------------------------------


def bootstrap(tmp_path: Path, document: Mapping[str, Any] = BOOTSTRAP) -> Bootstrap:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(dict(document)))
    loaded = load_config(path)
    assert isinstance(loaded, Bootstrap)
    return loaded


def test_load_config_tells_a_bootstrap_from_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert isinstance(load_config(path), Snapshot)
    loaded = bootstrap(tmp_path)
    # Relative paths are the bootstrap file's: the cache next to it by default.
    assert loaded.settings.token_file == str(tmp_path / "gw.token")
    assert loaded.settings.cache_dir == str(tmp_path / ".meshgate-cache")


def test_pushed_keys_replace_the_bootstrap_keys_whole() -> None:
    base = {**BOOTSTRAP, "limits": {"max_body_size": "1MiB"}, "telemetry": {"logs": {"level": "debug"}}}
    merged = merge(base, {**PUSHED, "telemetry": {"logs": {"access_log": False}}})
    assert merged == {
        **BOOTSTRAP,
        **PUSHED,
        "limits": {"max_body_size": "1MiB"},
        "telemetry": {"logs": {"access_log": False}},
    }


@pytest.mark.parametrize(
    ("pushed", "expected"),
    [
        ([1], "(document): expected a mapping at the top level, got a list"),
        (
            {**PUSHED, "service": "x", "listen": "0.0.0.0:1"},
            "service: set by the gateway's bootstrap file, not by the config service\n"
            "listen: set by the gateway's bootstrap file, not by the config service",
        ),
        ({"config_service": {}}, "config_service: set by the gateway's bootstrap file, not by the config service"),
    ],
)
def test_merge_refuses(pushed: object, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        merge(BOOTSTRAP, pushed)
    assert str(info.value) == expected


def test_pushed_bundle_names_point_at_files_stored_by_content_in_the_service_cache(tmp_path: Path) -> None:
    loaded = bootstrap(tmp_path)
    authz = {"bundle": "authz-v1.2", "shadow": {"bundle": "next"}}
    compiled = compile_pushed(loaded, {**PUSHED, "authz": authz})
    assert compiled.bundles == (("authz.bundle", "authz-v1.2"), ("authz.shadow.bundle", "next"))
    assert compiled.directory == tmp_path / ".meshgate-cache" / "orders"  # the service's own part of cache_dir
    one, two = "1" * 64, "2" * 64
    snapshot = compiled.with_bundles({"authz-v1.2": one, "next": two})
    assert snapshot.authz is not None
    assert snapshot.authz.primary.bundle == str(tmp_path / f".meshgate-cache/orders/bundles/authz-v1.2/{one}.tar.gz")
    assert snapshot.authz.shadow is not None
    assert snapshot.authz.shadow.bundle == str(tmp_path / f".meshgate-cache/orders/bundles/next/{two}.tar.gz")
    # /config shows what was pushed: the name, not the gateway's path.
    assert snapshot.document["authz"] == authz
    # Other bundle files under the same config: another snapshot (the store applies it, not "nothing changed").
    assert compiled.with_bundles({"authz-v1.2": one, "next": two}).hash == snapshot.hash
    assert compiled.with_bundles({"authz-v1.2": two, "next": two}).hash != snapshot.hash
    assert snapshot.hash != compiled.snapshot.hash


def test_a_bootstrap_bundle_stays_a_path_relative_to_the_bootstrap(tmp_path: Path) -> None:
    loaded = bootstrap(tmp_path, {**BOOTSTRAP, "authz": {"bundle": "./policy"}})
    compiled = compile_pushed(loaded, PUSHED)
    assert compiled.bundles == ()
    assert compiled.with_bundles({}) is compiled.snapshot
    assert compiled.snapshot.authz is not None
    assert compiled.snapshot.authz.primary.bundle == str(tmp_path / "policy")


def test_an_opa_engine_downloads_nothing(tmp_path: Path) -> None:
    compiled = compile_pushed(bootstrap(tmp_path), {**PUSHED, "authz": {"engine": "opa", "opa_url": "http://o:1"}})
    assert compiled.bundles == ()


@pytest.mark.parametrize("name", ["../etc/x", "a/b", "..", "a b"])
def test_a_bundle_name_that_is_a_path_is_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_pushed(bootstrap(tmp_path), {**PUSHED, "authz": {"bundle": name}})
    hint = 'a bundle stored in the config service: letters, digits, ".", "_", "-"'
    assert str(info.value) == f'authz.bundle: invalid bundle name "{name}" ({hint})'


def test_the_merged_config_compiles_with_the_bootstrap_settings(tmp_path: Path) -> None:
    loaded = bootstrap(tmp_path)
    snapshot = compile_pushed(loaded, PUSHED).snapshot
    # Equal settings: the store's restart-only check against the bound bootstrap passes.
    assert (snapshot.listen, snapshot.config_service) == (loaded.snapshot.listen, loaded.snapshot.config_service)


def test_a_pushed_version_that_does_not_compile_lists_every_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        compile_pushed(bootstrap(tmp_path), edited({"routes[0].cluster": "nope", "limits": {"max_headers": 0}}, PUSHED))
    assert str(info.value) == 'routes[0].cluster: unknown cluster "nope"\nlimits.max_headers: must be >= 1'


# --- the token ------------------------------------------------------------------------------------------------------


def test_read_token_strips_whitespace(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("  secret-token \n")
    assert read_token(tmp_path / "t") == "secret-token"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read {path}: No such file or directory"),
        ("\n", "{path} must hold one token on one line"),
        ("a\nb", "{path} must hold one token on one line"),
    ],
)
def test_read_token_refuses_without_showing_the_token(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "t"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        read_token(path)
    assert str(info.value) == "config_service.token_file: " + message.format(path=path)
