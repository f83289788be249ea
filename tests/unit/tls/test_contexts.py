"""TLS files as a config applies them: contexts built from real certificates (made at test time), and every way
the files can be wrong, with the exact ``path: problem`` line (``meshgate check``, a reload, start-up)."""

from __future__ import annotations

import random
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from gateway.cli import main
from gateway.config.compile import compile_document
from gateway.config.errors import ConfigError
from gateway.config.snapshot import Cluster, ListenerTls, UpstreamTls
from gateway.config.sources.file import resolve_paths
from gateway.config.store import SnapshotStore
from gateway.serving import Serving
from gateway.tls.contexts import check_tls, client_context, server_context, upstream_contexts
from gateway.upstream.clusters import Upstreams
from telemetry.metrics import Metrics
from tests.certs import CA, Issued, make_ca

ENCRYPTED_KEY = b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n"


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return make_ca(tmp_path)


@pytest.fixture
def leaf(ca: CA) -> Issued:
    return ca.issue("gw")


def problem(call: Any, *args: Any) -> str:
    with pytest.raises(ConfigError) as info:
        call(*args)
    return str(info.value)


# --- the listener ---------------------------------------------------------------------------------------------------


def test_listener_context_defaults(leaf: Issued) -> None:
    context = server_context(ListenerTls(str(leaf.cert_file), str(leaf.key_file)))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE  # no client certificate asked for without client_ca_file
    tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12
    assert all(name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name) for name in tls12)
    assert context.options & ssl.OP_NO_COMPRESSION


def test_listener_min_version_and_client_ca(ca: CA, leaf: Issued) -> None:
    settings = ListenerTls(str(leaf.cert_file), str(leaf.key_file), "1.3", str(ca.cert_file))
    context = server_context(settings)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3
    assert context.verify_mode == ssl.CERT_REQUIRED


def test_listener_file_problems(tmp_path: Path, ca: CA, leaf: Issued) -> None:
    cert, key = str(leaf.cert_file), str(leaf.key_file)
    missing = str(tmp_path / "missing.pem")
    other = ca.issue("other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(ENCRYPTED_KEY)

    def listener(cert_file: str, key_file: str, client_ca: str | None = None) -> str:
        return problem(server_context, ListenerTls(cert_file, key_file, "1.2", client_ca))

    assert listener(missing, key) == f"tls.cert_file: cannot read {missing}: No such file or directory"
    assert listener(cert, missing) == f"tls.key_file: cannot read {missing}: No such file or directory"
    assert listener(str(tmp_path), key) == f"tls.cert_file: cannot read {tmp_path}: Is a directory"
    assert listener(str(garbage), key) == f"tls.cert_file: no PEM certificate in {garbage}"
    assert listener(key, key) == f"tls.cert_file: no PEM certificate in {key}"
    assert listener(cert, cert) == f"tls.key_file: no PEM private key in {cert}"
    assert listener(cert, str(other.key_file)) == f"tls.key_file: does not match the certificate in {cert}"
    assert listener(cert, str(encrypted)) == (
        f"tls.key_file: {encrypted} holds an encrypted private key (give it unencrypted)"
    )
    assert listener(cert, key, missing) == f"tls.client_ca_file: cannot read {missing}: No such file or directory"
    assert listener(cert, key, str(garbage)) == f"tls.client_ca_file: no PEM certificate in {garbage}"


# --- upstreams ------------------------------------------------------------------------------------------------------


def test_upstream_context_verifies_by_default(ca: CA) -> None:
    system = client_context(UpstreamTls(), "clusters[0].tls").context
    assert (system.verify_mode, system.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert system.minimum_version == ssl.TLSVersion.TLSv1_2
    own = client_context(UpstreamTls(ca_file=str(ca.cert_file)), "clusters[0].tls").context
    assert own.cert_store_stats()["x509_ca"] == 1  # only the configured CA, not the system's


def test_insecure_skip_verify_turns_every_check_off() -> None:
    context = client_context(UpstreamTls(insecure_skip_verify=True), "clusters[0].tls").context
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_NONE, False)


def test_upstream_file_problems_name_the_cluster(tmp_path: Path, ca: CA, leaf: Issued) -> None:
    missing = str(tmp_path / "nope.pem")
    other = ca.issue("other")
    clusters = {
        "a": Cluster("a", tls=UpstreamTls(ca_file=str(ca.cert_file))),
        "b": Cluster("b", tls=UpstreamTls(ca_file=missing)),
        "c": Cluster("c"),
        "d": Cluster("d", tls=UpstreamTls(ca_file=str(leaf.key_file))),
        "e": Cluster("e", tls=UpstreamTls(cert_file=str(leaf.cert_file), key_file=str(other.key_file))),
        "f": Cluster("f", tls=UpstreamTls(cert_file=missing, key_file=str(leaf.key_file))),
    }
    assert problem(upstream_contexts, clusters) == "\n".join(
        [
            f"clusters[1].tls.ca_file: cannot read {missing}: No such file or directory",
            f"clusters[3].tls.ca_file: no PEM certificate in {leaf.key_file}",
            f"clusters[4].tls.key_file: does not match the certificate in {leaf.cert_file}",
            f"clusters[5].tls.cert_file: cannot read {missing}: No such file or directory",
        ]
    )


def test_fingerprint_follows_settings_and_file_contents(ca: CA, leaf: Issued) -> None:
    settings = UpstreamTls(ca_file=str(ca.cert_file), cert_file=str(leaf.cert_file), key_file=str(leaf.key_file))
    first = client_context(settings, "x").fingerprint
    assert client_context(settings, "x").fingerprint == first
    assert client_context(UpstreamTls(ca_file=str(ca.cert_file)), "x").fingerprint != first
    ca.issue("gw")  # the same files, new contents (a rotated client certificate)
    assert client_context(settings, "x").fingerprint != first


# --- meshgate check, and a config applied ---------------------------------------------------------------------------


def test_check_reports_listener_and_cluster_files(tmp_path: Path, leaf: Issued) -> None:
    document = {
        "service": "orders",
        "tls": {"cert_file": "gw.pem", "key_file": "missing.key"},
        "routes": [{"name": "r", "cluster": "orders"}],
        "clusters": [{"name": "orders", "endpoints": ["127.0.0.1:9001"], "tls": {"ca_file": "ca/none.pem"}}],
    }
    snapshot = resolve_paths(compile_document(document), tmp_path)
    assert problem(check_tls, snapshot) == "\n".join(
        [
            f"tls.key_file: cannot read {tmp_path / 'missing.key'}: No such file or directory",
            f"clusters[0].tls.ca_file: cannot read {tmp_path / 'ca/none.pem'}: No such file or directory",
        ]
    )


def test_meshgate_check_loads_the_certificate_files(
    tmp_path: Path, ca: CA, leaf: Issued, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "service: orders\n"
        "tls: {cert_file: gw.pem, key_file: gw.key}\n"
        "routes: [{name: r, cluster: orders}]\n"
        "clusters: [{name: orders, endpoints: ['127.0.0.1:9001'], tls: {ca_file: test-ca.pem}}]\n"
    )
    assert main(["check", "-c", str(config)]) == 0
    assert capsys.readouterr().out == "ok\n"
    ca.cert_file.unlink()
    assert main(["check", "-c", str(config)]) == 1
    assert capsys.readouterr().err == (
        f"clusters[0].tls.ca_file: cannot read {ca.cert_file}: No such file or directory\n"
    )


@pytest.fixture
async def store() -> AsyncIterator[tuple[SnapshotStore, Upstreams, list[Serving]]]:
    metrics = Metrics()
    upstreams = Upstreams(random.Random(1), grace=0.0, metrics=metrics)
    published: list[Serving] = []
    yield SnapshotStore(upstreams, metrics, published.append), upstreams, published
    await upstreams.close()


def _document(tls: dict[str, Any] | None, listener: dict[str, Any] | None = None) -> dict[str, Any]:
    cluster: dict[str, Any] = {"name": "orders", "endpoints": ["127.0.0.1:9001"]}
    if tls is not None:
        cluster["tls"] = tls
    document: dict[str, Any] = {"service": "orders", "routes": [{"name": "r", "cluster": "orders"}]}
    document["clusters"] = [cluster]
    if listener is not None:
        document["tls"] = listener
    return document


async def test_a_config_whose_files_do_not_load_is_rejected(store: Any, tmp_path: Path, ca: CA) -> None:
    snapshots, _, published = store
    good = resolve_paths(compile_document(_document({"ca_file": "test-ca.pem"})), tmp_path)
    serving = await snapshots.apply(good, "file:x")
    runtime = serving.clusters["orders"]
    assert (runtime.scheme, runtime.server_hostname) == ("https", None)
    assert runtime.tls is not None
    assert runtime.session.connector is not None
    broken = resolve_paths(compile_document(_document({"ca_file": "other.pem"})), tmp_path)
    with pytest.raises(ConfigError) as info:
        await snapshots.apply(broken, "file:x")
    missing = tmp_path / "other.pem"
    assert str(info.value) == f"clusters[0].tls.ca_file: cannot read {missing}: No such file or directory"
    assert len(published) == 1


async def test_pools_are_kept_until_tls_settings_or_files_change(store: Any, tmp_path: Path, ca: CA) -> None:
    snapshots, _, _ = store
    named = _document({"ca_file": "test-ca.pem", "server_name": "orders.internal"})
    first = (await snapshots.apply(resolve_paths(compile_document(named), tmp_path), "file:x")).clusters["orders"]
    assert first.server_hostname == "orders.internal"
    named["routes"][0]["timeout"] = "1s"  # an unrelated change: the pool and its connections stay
    same = (await snapshots.apply(resolve_paths(compile_document(named), tmp_path), "file:x")).clusters["orders"]
    assert same is first
    make_ca(tmp_path)  # the CA file rewritten (a new CA): the next apply builds a new pool
    named["routes"][0]["timeout"] = "2s"
    fresh = (await snapshots.apply(resolve_paths(compile_document(named), tmp_path), "file:x")).clusters["orders"]
    assert fresh is not first
    plain = (await snapshots.apply(compile_document(_document(None)), "file:x")).clusters["orders"]
    assert (plain.scheme, plain.tls) == ("http", None)


async def test_turning_listener_tls_on_or_off_needs_a_restart(store: Any, tmp_path: Path, ca: CA) -> None:
    snapshots, _, _ = store
    leaf = ca.issue("gw")
    await snapshots.apply(compile_document(_document(None)), "file:x")
    pair = {"cert_file": str(leaf.cert_file), "key_file": str(leaf.key_file)}
    with pytest.raises(ConfigError) as info:
        await snapshots.apply(compile_document(_document(None, pair)), "file:x")
    assert str(info.value) == "tls: cannot change while running (restart meshgate to apply)"


async def test_listener_files_are_checked_when_they_change(store: Any, ca: CA) -> None:
    snapshots, _, _ = store
    leaf, other = ca.issue("gw"), ca.issue("other")
    pair = {"cert_file": str(leaf.cert_file), "key_file": str(leaf.key_file)}
    await snapshots.apply(compile_document(_document(None, pair)), "file:x")
    mixed = {"cert_file": str(other.cert_file), "key_file": str(leaf.key_file)}
    with pytest.raises(ConfigError) as info:
        await snapshots.apply(compile_document(_document(None, mixed)), "file:x")
    assert str(info.value) == f"tls.key_file: does not match the certificate in {other.cert_file}"
    with_ca = {**pair, "client_ca_file": str(ca.cert_file)}
    with pytest.raises(ConfigError) as info:
        await snapshots.apply(compile_document(_document(None, with_ca)), "file:x")
    assert str(info.value) == "tls.client_ca_file: cannot change while running (restart meshgate to apply)"
    await snapshots.apply(compile_document(_document(None, {**pair, "min_version": "1.3"})), "file:x")


async def test_insecure_skip_verify_is_logged_at_every_apply(store: Any) -> None:
    snapshots, _, _ = store
    document = _document({"insecure_skip_verify": True})
    with structlog.testing.capture_logs() as logs:
        await snapshots.apply(compile_document(document), "file:x")
        document["routes"][0]["timeout"] = "1s"
        await snapshots.apply(compile_document(document), "file:x")
    warnings = [e for e in logs if e["event"] == "upstream_tls_verification_disabled"]
    assert [(e["log_level"], e["upstream"]) for e in warnings] == [("warning", "orders"), ("warning", "orders")]
