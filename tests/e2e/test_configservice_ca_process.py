"""The mesh CA in a real ``meshgate configservice`` process: the CA created in DIR/ca and kept across restarts,
CA files and rotation flags, and gateway tokens revoked by editing the tokens file (no restart)."""

from __future__ import annotations

import datetime
import json
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from tests.certs import make_ca
from tests.configservice_proc import ADMIN_TOKEN, GATEWAY_TOKEN, config_service
from tests.csr import ec_key, key_pem, make_csr
from tests.procs import ROOT, free_port, stop, wait_http

pytestmark = pytest.mark.e2e

ORDERS_TOKEN = "orders-token-for-tests-0123456789abcdef"


def request(url: str, token: str, *, csr: bytes | None = None) -> tuple[int, bytes, dict[str, str]]:
    """GET ``url`` (or POST the CSR): status, body, headers."""
    req = urllib.request.Request(url, data=csr, method="POST" if csr is not None else "GET")
    req.add_header("Authorization", f"Bearer {token}")
    if csr is not None:
        req.add_header("Content-Type", "application/x-pem-file")
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read(), dict(error.headers)


def issue(base: str, token: str) -> tuple[int, dict[str, Any]]:
    status, body, _ = request(f"{base}/v1/certificates", token, csr=make_csr(ec_key()))
    return status, json.loads(body)


def eventually(check: Callable[[], bool], what: str, timeout: float = 6.0) -> float:
    """Seconds until ``check()`` held (polling); fails the test after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.1)
    pytest.fail(f"{what} within {timeout}s")


def write_tokens(path: Path, *entries: dict[str, str]) -> None:
    # By rename, as an editor or config management would: never a half-written file.
    temporary = path.with_suffix(".tmp")
    temporary.write_text(yaml.safe_dump({"tokens": list(entries)}))
    temporary.replace(path)


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    lines = (json.loads(line) for line in path.read_text().splitlines() if line.startswith("{"))
    return [line for line in lines if line.get("event") == event]


OPS = {"name": "ops", "token": ADMIN_TOKEN, "role": "admin"}
FLEET = {"name": "fleet", "token": GATEWAY_TOKEN, "role": "gateway"}
ORDERS = {"name": "orders-gw", "token": ORDERS_TOKEN, "role": "gateway", "service": "orders"}


def test_ca_in_data_dir_and_token_revocation(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with config_service(data) as cs:
        # The CA was created on first start.
        assert stat.S_IMODE((data / "ca" / "ca.key").stat().st_mode) == 0o600
        ca_pem = (data / "ca" / "ca.pem").read_bytes()
        status, bundle, headers = request(f"{cs.url}/v1/ca", GATEWAY_TOKEN)
        assert (status, bundle, headers["Content-Type"]) == (200, ca_pem, "application/x-pem-file")
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
        assert ca_cert.subject.rfc4514_string() == "CN=meshgate mesh CA meshgate.local"

        # The fleet token has no service: 403. Add a token bound to orders to the file: it works without a restart.
        assert issue(cs.url, GATEWAY_TOKEN)[0] == 403
        assert issue(cs.url, ORDERS_TOKEN)[0] == 401
        write_tokens(cs.tokens_file, OPS, FLEET, ORDERS)
        eventually(lambda: issue(cs.url, ORDERS_TOKEN)[0] == 201, "the added token was not accepted")
        status, answer = issue(cs.url, ORDERS_TOKEN)
        assert answer["identity"] == "spiffe://meshgate.local/service/orders"
        x509.load_pem_x509_certificate(answer["certificate"].encode()).verify_directly_issued_by(ca_cert)

        # Revoke it: within the poll interval it can no longer obtain certificates.
        write_tokens(cs.tokens_file, OPS, FLEET)
        took = eventually(lambda: issue(cs.url, ORDERS_TOKEN)[0] == 401, "the revoked token still worked")
        assert took < 3.0
        eventually(
            lambda: any(e["removed"] == ["orders-gw"] for e in log_events(cs.log_path, "tokens_reloaded")),
            "no tokens_reloaded line for orders-gw",
        )
        assert ORDERS_TOKEN not in cs.log_path.read_text()

        # A broken file is logged and the previous set kept; SIGHUP reloads (and does not end the process).
        cs.tokens_file.write_text("tokens:\n  - {name: ops, token: short, role: admin}\n")
        eventually(lambda: bool(log_events(cs.log_path, "tokens_reload_failed")), "no tokens_reload_failed line")
        (failed,) = log_events(cs.log_path, "tokens_reload_failed")
        assert failed["problems"] == ["tokens[0].token: required: at least 16 characters, no spaces"]
        assert request(f"{cs.url}/v1/ca", GATEWAY_TOKEN)[0] == 200
        write_tokens(cs.tokens_file, OPS, FLEET, ORDERS)
        assert cs.process is not None
        cs.process.send_signal(signal.SIGHUP)
        eventually(lambda: issue(cs.url, ORDERS_TOKEN)[0] == 201, "the token was not restored")
        assert cs.process.poll() is None

        # The CA survives a restart (loaded, not created again).
        cs.restart()
        assert request(f"{cs.url}/v1/ca", GATEWAY_TOKEN)[1] == ca_pem
        eventually(
            lambda: any(e["source"] == "data" for e in log_events(cs.log_path, "mesh_ca_ready")), "no mesh_ca_ready"
        )
        (ready,) = [e for e in log_events(cs.log_path, "mesh_ca_ready") if e["source"] == "data"]
        assert ready["trusted"] == 1
        assert issue(cs.url, ORDERS_TOKEN)[0] == 201


def test_generated_tokens_file_is_reloaded(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    log_path = tmp_path / "cs.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "configservice", "--data", str(data), "--listen", f"127.0.0.1:{port}"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/healthz", process=process)
        tokens_file = data / "tokens.yaml"
        entries = yaml.safe_load(tokens_file.read_text())["tokens"]
        admin, gateway = entries
        assert issue(base, gateway["token"])[0] == 403  # generated tokens are bound to no service
        write_tokens(tokens_file, admin, {**gateway, "service": "orders"})
        eventually(lambda: issue(base, gateway["token"])[0] == 201, "the generated file's edit was not reloaded")
        write_tokens(tokens_file, admin)
        eventually(lambda: issue(base, gateway["token"])[0] == 401, "the removed generated token still worked")
    finally:
        stop(process)


def test_ca_files_rotation_and_flags(tmp_path: Path) -> None:
    old, new = make_ca(tmp_path / "old", "old-ca"), make_ca(tmp_path / "new", "new-ca")
    key_file = tmp_path / "new" / "new-ca.key"
    key_file.write_bytes(key_pem(new.key))
    key_file.chmod(0o600)
    args = [
        "--ca-cert",
        str(new.cert_file),
        "--ca-key",
        str(key_file),
        "--ca-trust",
        str(old.cert_file),
        "--trust-domain",
        "prod.example",
        "--cert-ttl",
        "2h",
    ]
    data = tmp_path / "data"
    with config_service(data, extra_args=args) as cs:
        write_tokens(cs.tokens_file, OPS, ORDERS)
        eventually(lambda: issue(cs.url, ORDERS_TOKEN)[0] == 201, "the orders token was not accepted")
        assert not (data / "ca").exists()  # files given: nothing created in DIR
        status, bundle, headers = request(f"{cs.url}/v1/ca", ORDERS_TOKEN)
        assert x509.load_pem_x509_certificates(bundle) == [new.cert, old.cert]  # the signer first
        tag = headers["ETag"]
        req = urllib.request.Request(f"{cs.url}/v1/ca", headers={"Authorization": f"Bearer {ORDERS_TOKEN}"})
        req.add_header("If-None-Match", tag)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(req, timeout=10)
        with caught.value as not_modified:
            assert not_modified.code == 304
        status, answer = issue(cs.url, ORDERS_TOKEN)
        assert (status, answer["identity"]) == (201, "spiffe://prod.example/service/orders")
        cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
        cert.verify_directly_issued_by(new.cert)
        lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
        assert datetime.timedelta(minutes=115) < lifetime <= datetime.timedelta(hours=2)
        assert answer["ca"].encode() == bundle


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--ca-cert", "x.pem"], 2, "--ca-cert and --ca-key go together"),
        (["--trust-domain", "Not_A.Domain"], 2, "invalid trust domain 'Not_A.Domain'"),
        (["--cert-ttl", "1m"], 2, "certificate TTL '1m' is out of range (5m..30d)"),
        (["--ca-trust", "/nonexistent/ca.pem"], 1, "mesh CA: /nonexistent/ca.pem: No such file or directory"),
    ],
)
def test_bad_ca_flags(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "configservice",
            "--data",
            str(tmp_path / "d"),
            "--listen",
            f"127.0.0.1:{free_port()}",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == code
    output = result.stdout + result.stderr
    assert message in output
    assert "Traceback" not in output


def test_non_ca_certificate_refused(tmp_path: Path) -> None:
    test_ca = make_ca(tmp_path, "ca")
    leaf = test_ca.issue("leaf")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "configservice",
            "--data",
            str(tmp_path / "d"),
            "--listen",
            f"127.0.0.1:{free_port()}",
            "--ca-cert",
            str(leaf.cert_file),
            "--ca-key",
            str(leaf.key_file),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"mesh CA: {leaf.cert_file}: CN=leaf is not a CA certificate (basicConstraints CA:true)" in result.stderr
    assert "Traceback" not in result.stderr
