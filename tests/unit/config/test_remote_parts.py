"""The pure parts of the remote source (report headers, the default gateway id), the on-disk cache, and the store's
handling of config-service versions (numbering, a confirmed copy, the bound listener settings)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from gateway.config.compile import compile_document
from gateway.config.errors import ConfigError
from gateway.config.sources.bundles import prune_bundles
from gateway.config.sources.cache import (
    CacheError,
    read_cached,
    read_instances,
    service_dir,
    write_atomic,
    write_cached,
    write_instances,
)
from gateway.config.sources.remote import default_gateway_id, poll_headers
from gateway.config.store import SnapshotStore
from gateway.serving import Serving
from gateway.upstream.clusters import Upstreams
from telemetry.metrics import Metrics

from .sample import BASE, edited

# --- report headers -------------------------------------------------------------------------------------------------


def test_poll_headers_report_the_applied_version() -> None:
    assert poll_headers("gw-1", 4, None) == {"X-Meshgate-Gateway": "gw-1", "X-Meshgate-Applied-Version": "4"}


def test_poll_headers_report_a_rejection_on_one_bounded_line() -> None:
    error = 'routes[0].match.path_regex: invalid regular expression "é\n' + "x" * 400
    headers = poll_headers("gw-1", 4, (5, error))
    assert headers["X-Meshgate-Rejected-Version"] == "5"
    sent = headers["X-Meshgate-Rejected-Error"]
    assert len(sent) == 300
    assert sent.startswith('routes[0].match.path_regex: invalid regular expression "??x')
    assert sent.isascii()


@pytest.mark.parametrize(
    ("hostname", "expected"),
    [
        ("node-1.cluster.local", "orders-node-1-8080"),
        ("weird host", "orders-weird-host-8080"),
        ("", "orders-host-8080"),
    ],
)
def test_default_gateway_id(hostname: str, expected: str) -> None:
    assert default_gateway_id("orders", hostname, 8080) == expected


# --- the cache ------------------------------------------------------------------------------------------------------


def test_cache_round_trip(tmp_path: Path) -> None:
    cache = service_dir(tmp_path / "cache", "orders")
    assert cache == tmp_path / "cache" / "orders"
    digest = "a" * 64
    write_cached(cache, "orders", "http://cs", 7, '"7-abc"', {"routes": []}, {"service": "orders"}, {"authz": digest})
    cached = read_cached(cache, "orders")
    assert cached is not None
    assert (cached.version, cached.etag, cached.pushed) == (7, '"7-abc"', {"routes": []})
    assert (cached.url, cached.bundles) == ("http://cs", {"authz": digest})
    assert cache.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in cache.iterdir()] == ["config.json"]  # no temp file left behind


def test_a_cache_written_before_urls_and_bundles_were_recorded_still_reads(tmp_path: Path) -> None:
    body = {"format": 1, "service": "orders", "version": 3, "etag": '"3"', "pushed": {}}
    (tmp_path / "config.json").write_text(json.dumps(body))
    cached = read_cached(tmp_path, "orders")
    assert cached is not None
    assert (cached.version, cached.url, cached.bundles) == (3, None, {})


def test_instance_lists_round_trip_per_registry_service(tmp_path: Path) -> None:
    assert read_instances(tmp_path, "payments") is None
    write_instances(tmp_path, "payments", "http://cs", 4, ["10.0.0.1:80", "[::1]:81"])
    assert read_instances(tmp_path, "payments") == ["10.0.0.1:80", "[::1]:81"]
    assert read_instances(tmp_path, "stock") is None
    (tmp_path / "instances" / "stock.json").write_text(json.dumps({"format": 1, "service": "other"}))
    with pytest.raises(CacheError) as info:
        read_instances(tmp_path, "stock")
    assert str(info.value) == f"{tmp_path / 'instances' / 'stock.json'} is not a meshgate instance cache for 'stock'"


def test_prune_keeps_the_digests_named_and_other_names(tmp_path: Path) -> None:
    for name, digest in [("authz", "a"), ("authz", "b"), ("authz", "c"), ("other", "x")]:
        write_atomic(tmp_path / "bundles" / name / f"{digest}.tar.gz", b"x")
    removed = prune_bundles(tmp_path, {"authz": {"b", "c"}})
    assert removed == [tmp_path / "bundles" / "authz" / "a.tar.gz"]
    assert sorted(p.name for p in (tmp_path / "bundles" / "authz").iterdir()) == ["b.tar.gz", "c.tar.gz"]
    assert (tmp_path / "bundles" / "other" / "x.tar.gz").exists()


def test_no_cache_is_none(tmp_path: Path) -> None:
    assert read_cached(tmp_path, "orders") is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "cannot read {path}: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        ("[]", "{path} is not a meshgate config cache"),
        (json.dumps({"format": 1, "service": "payments"}), "{path} holds service 'payments', not 'orders'"),
        (json.dumps({"format": 1, "service": "orders", "version": "1"}), "{path} is incomplete"),
        (
            json.dumps(
                {"format": 1, "service": "orders", "version": 1, "etag": '"1"', "pushed": {}, "bundles": {"a": "../x"}}
            ),
            "{path} is incomplete",
        ),
    ],
)
def test_an_unusable_cache_says_why(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(CacheError) as info:
        read_cached(tmp_path, "orders")
    assert str(info.value) == message.format(path=tmp_path / "config.json")


def test_write_atomic_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "b" / "x.tar.gz"
    write_atomic(path, b"one")
    inode = path.stat().st_ino
    write_atomic(path, b"two")
    assert (path.read_bytes(), path.stat().st_ino != inode) == (b"two", True)


# --- the store and config-service versions --------------------------------------------------------------------------


@pytest.fixture
async def store() -> Any:
    metrics = Metrics()
    upstreams = Upstreams(random.Random(1), grace=0.0, metrics=metrics)
    published: list[Serving] = []
    yield SnapshotStore(upstreams, metrics, published.append), metrics, published
    await upstreams.close()


async def test_the_service_version_is_the_version_served(store: Any) -> None:
    snapshots, metrics, _ = store
    serving = await snapshots.apply(compile_document(BASE), "config_service:http://cs", version=12)
    assert serving.snapshot.version == 12
    assert metrics.registry.get_sample_value("meshgate_config_version") == 12


async def test_the_same_content_under_a_new_version_or_source_is_restamped(store: Any) -> None:
    snapshots, metrics, published = store
    first = await snapshots.apply(compile_document(BASE), "cache:/c/config.json", version=3)
    again = await snapshots.apply(compile_document(BASE), "config_service:http://cs", version=3)
    assert (again.snapshot.source, again.snapshot.version) == ("config_service:http://cs", 3)
    assert again.clusters is first.clusters  # runtimes kept: nothing but the provenance changed
    rolled = await snapshots.apply(compile_document(BASE), "config_service:http://cs", version=5)
    assert rolled.snapshot.version == 5
    assert metrics.registry.get_sample_value("meshgate_config_version") == 5
    same = await snapshots.apply(compile_document(BASE), "config_service:http://cs", version=5)
    assert same is rolled
    assert len(published) == 3


async def test_the_first_config_must_keep_the_bound_listener_settings(store: Any) -> None:
    snapshots, _, published = store
    bootstrap = {"service": "orders", "config_service": {"url": "http://cs", "token_file": "t"}}
    snapshots.bind(compile_document(bootstrap, partial=True))
    pushed = edited({"limits": {"max_header_size": "16KiB"}}, {**BASE, **bootstrap})
    with pytest.raises(ConfigError) as info:
        await snapshots.apply(compile_document(pushed), "config_service:http://cs", version=1)
    assert str(info.value) == "limits.max_header_size: cannot change while running (restart meshgate to apply)"
    assert published == []
    await snapshots.apply(compile_document({**BASE, **bootstrap}), "config_service:http://cs", version=1)
    assert len(published) == 1


async def test_switching_between_file_and_config_service_needs_a_restart(store: Any) -> None:
    snapshots, _, _ = store
    await snapshots.apply(compile_document(BASE), "file:x")
    with_service = {**BASE, "config_service": {"url": "http://cs", "token_file": "t"}}
    with pytest.raises(ConfigError) as info:
        await snapshots.apply(compile_document(with_service), "file:x")
    assert str(info.value) == "config_service: cannot change while running (restart meshgate to apply)"
