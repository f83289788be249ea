"""The listener certificate's reload decisions, without sockets: a good pair replaces the served one, a broken pair
is refused and the old one kept, a config naming other files loads them at once (the handshake switch itself is
exercised end to end in ``tests/e2e/test_tls.py``)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import structlog

from gateway.config.errors import ConfigError
from gateway.config.snapshot import ListenerTls
from gateway.tls.reloader import ListenerCertificate
from tests.certs import make_ca


def test_reload_keeps_the_old_certificate_when_the_new_pair_is_broken(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    first = ca.issue("gw")
    certificate = ListenerCertificate(ListenerTls(str(first.cert_file), str(first.key_file)))
    assert certificate.serial == format(first.serial, "X")
    second = ca.issue("gw")  # same files, new pair
    with structlog.testing.capture_logs() as logs:
        assert certificate.reload("sighup") is True
    assert certificate.serial == format(second.serial, "X")
    assert [(e["event"], e["trigger"], e["serial"]) for e in logs] == [
        ("tls_certificate_reloaded", "sighup", format(second.serial, "X"))
    ]
    first.key_file.write_bytes(ca.issue("stray").key_file.read_bytes())  # the key no longer matches
    with structlog.testing.capture_logs() as logs:
        assert certificate.reload("file_changed") is False
    assert certificate.serial == format(second.serial, "X")
    assert logs[0]["event"] == "tls_reload_failed"
    assert logs[0]["errors"] == [
        {"path": "tls.key_file", "message": f"does not match the certificate in {first.cert_file}"}
    ]


def test_configure_loads_new_paths_and_min_version(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    first, other = ca.issue("gw"), ca.issue("other")
    certificate = ListenerCertificate(ListenerTls(str(first.cert_file), str(first.key_file)))
    certificate.configure(ListenerTls(str(other.cert_file), str(other.key_file), "1.3"))
    assert certificate.serial == format(other.serial, "X")
    assert certificate.context.minimum_version == ssl.TLSVersion.TLSv1_3  # the bound context: read per connection


def test_a_listener_whose_files_do_not_load_does_not_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        ListenerCertificate(ListenerTls(str(tmp_path / "gw.pem"), str(tmp_path / "gw.key")))
    assert str(info.value) == f"tls.cert_file: cannot read {tmp_path / 'gw.pem'}: No such file or directory"
