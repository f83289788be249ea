"""The ``tls`` sections (listener and per cluster): what compiles to what, and every rejected shape with its exact
message. Whether the named files load is ``tests/unit/tls/test_contexts.py``'s concern."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from gateway.config.compile import compile_document
from gateway.config.errors import ConfigError
from gateway.config.snapshot import ListenerTls, UpstreamTls
from gateway.config.sources.file import resolve_paths

from .sample import edited

C = "clusters[0]"
PAIR = {"cert_file": "gw.pem", "key_file": "gw.key"}


def case(edits: Mapping[str, object], *lines: str) -> object:
    return pytest.param(edits, "\n".join(lines), id=lines[0])


def test_no_tls_by_default() -> None:
    snapshot = compile_document(edited({}))
    assert snapshot.tls is None
    assert snapshot.clusters["orders"].tls is None


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (PAIR, ListenerTls("gw.pem", "gw.key", "1.2", None)),
        ({**PAIR, "min_version": "1.3"}, ListenerTls("gw.pem", "gw.key", "1.3", None)),
        ({**PAIR, "min_version": 1.3}, ListenerTls("gw.pem", "gw.key", "1.3", None)),  # YAML's unquoted 1.3
        ({**PAIR, "min_version": "1.2", "client_ca_file": "ca.pem"}, ListenerTls("gw.pem", "gw.key", "1.2", "ca.pem")),
    ],
)
def test_listener_tls(section: dict[str, object], expected: ListenerTls) -> None:
    assert compile_document(edited({"tls": section})).tls == expected


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({}, UpstreamTls()),  # verify against the system's CAs
        ({"ca_file": "ca.pem"}, UpstreamTls(ca_file="ca.pem")),
        ({"server_name": "Orders.Internal"}, UpstreamTls(server_name="orders.internal")),
        ({"server_name": "10.0.0.7"}, UpstreamTls(server_name="10.0.0.7")),
        (
            {"ca_file": "ca.pem", "cert_file": "c.pem", "key_file": "c.key"},
            UpstreamTls(ca_file="ca.pem", cert_file="c.pem", key_file="c.key"),
        ),
        ({"insecure_skip_verify": True}, UpstreamTls(insecure_skip_verify=True)),
        ({"insecure_skip_verify": False, "ca_file": "ca.pem"}, UpstreamTls(ca_file="ca.pem")),
    ],
)
def test_upstream_tls(section: dict[str, object], expected: UpstreamTls) -> None:
    assert compile_document(edited({f"{C}.tls": section})).clusters["orders"].tls == expected


def test_relative_files_resolve_against_the_config_directory(tmp_path: Path) -> None:
    snapshot = compile_document(
        edited(
            {
                "tls": {**PAIR, "client_ca_file": "/etc/ca.pem"},
                f"{C}.tls": {"ca_file": "certs/ca.pem", "cert_file": "c.pem", "key_file": "c.key"},
            }
        )
    )
    resolved = resolve_paths(snapshot, tmp_path)
    assert resolved.tls == ListenerTls(str(tmp_path / "gw.pem"), str(tmp_path / "gw.key"), "1.2", "/etc/ca.pem")
    assert resolved.clusters["orders"].tls == UpstreamTls(
        ca_file=str(tmp_path / "certs/ca.pem"), cert_file=str(tmp_path / "c.pem"), key_file=str(tmp_path / "c.key")
    )


REJECTED = [
    case({"tls": "on"}, 'tls: expected a mapping, got "on"'),
    case({"tls": {}}, "tls.cert_file: required", "tls.key_file: required"),
    case({"tls": {"cert_file": "gw.pem"}}, "tls.key_file: required"),
    case({"tls": {"key_file": "gw.key"}}, "tls.cert_file: required"),
    case({"tls": {**PAIR, "cert_file": ""}}, "tls.cert_file: must not be empty"),
    case({"tls": {**PAIR, "key_file": 5}}, "tls.key_file: expected a string, got 5"),
    case({"tls": {**PAIR, "min_version": "1.1"}}, 'tls.min_version: unsupported TLS version "1.1" (one of 1.2, 1.3)'),
    case({"tls": {**PAIR, "min_version": 1.0}}, 'tls.min_version: unsupported TLS version "1.0" (one of 1.2, 1.3)'),
    case({"tls": {**PAIR, "min_version": True}}, 'tls.min_version: expected "1.2" or "1.3", got true'),
    case({"tls": {**PAIR, "client_ca_file": ""}}, "tls.client_ca_file: must not be empty"),
    case({"tls": {**PAIR, "ca_file": "x"}}, 'tls.ca_file: unknown key (did you mean "cert_file"?)'),
    case({"tls": {**PAIR, "mode": "strict"}}, "tls.mode: unknown key"),
    case({"cert_file": "gw.pem"}, 'cert_file: unknown key (did you mean "tls.cert_file"?)'),
    case({f"{C}.tls": True}, "clusters[0].tls: expected a mapping, got true"),
    case({f"{C}.tls": {"cert_file": "c.pem"}}, "clusters[0].tls.key_file: required with cert_file"),
    case({f"{C}.tls": {"key_file": "c.key"}}, "clusters[0].tls.cert_file: required with key_file"),
    case({f"{C}.tls": {"ca_file": ""}}, "clusters[0].tls.ca_file: must not be empty"),
    case(
        {f"{C}.tls": {"ca_file": "ca.pem", "insecure_skip_verify": True}},
        "clusters[0].tls.ca_file: cannot be used with insecure_skip_verify: true (nothing is verified)",
    ),
    case(
        {f"{C}.tls": {"insecure_skip_verify": "yes"}},
        'clusters[0].tls.insecure_skip_verify: expected true or false, got "yes"',
    ),
    case(
        {f"{C}.tls": {"server_name": "orders internal"}},
        'clusters[0].tls.server_name: invalid server name "orders internal" '
        '(a DNS name like "orders.internal", or an IP address)',
    ),
    case(
        {f"{C}.tls": {"server_name": "*.internal"}},
        'clusters[0].tls.server_name: invalid server name "*.internal" '
        '(a DNS name like "orders.internal", or an IP address)',
    ),
    case({f"{C}.tls": {"server_name": 5}}, "clusters[0].tls.server_name: expected a string, got 5"),
    case({f"{C}.tls": {"verify": False}}, "clusters[0].tls.verify: unknown key"),
    # A TLS setting beside `tls` rather than inside it: a cluster without TLS that names a server.
    case({f"{C}.server_name": "orders"}, 'clusters[0].server_name: unknown key (did you mean "tls.server_name"?)'),
    case({f"{C}.ca_file": "ca.pem"}, 'clusters[0].ca_file: unknown key (did you mean "tls.ca_file"?)'),
    case(
        {f"{C}.insecure_skip_verify": True},
        'clusters[0].insecure_skip_verify: unknown key (did you mean "tls.insecure_skip_verify"?)',
    ),
]


@pytest.mark.parametrize(("edits", "expected"), REJECTED)
def test_rejected(edits: Mapping[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_document(edited(edits))
    assert str(info.value) == expected
