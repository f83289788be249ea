"""Sanity of the OPA stand-in (``tests/opa_server.py``): it must answer as OPA does, or the RemoteEngine and push
tests prove nothing. Each expectation below is OPA's documented REST behaviour."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from policy.bundle import build_tarball
from tests.opa_server import opa_server
from tests.procs import ROOT, free_port, wait_until

POLICY = """package demo

default allow := false

allow if input.user == "alice"

conflict := true if input.a
conflict := false if input.b
"""


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with opa_server(decision_ids=True) as base:
        yield base


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with http.request(method, url, **kwargs) as response:
        body = await response.json(content_type=None) if response.status != 204 else None
        return response.status, body


async def test_policy_put_get_list_delete(url: str, http: aiohttp.ClientSession) -> None:
    assert await call(http, "PUT", f"{url}/v1/policies/sanity/p.rego", data="package sanity\nx := 1\n") == (200, {})
    status, body = await call(http, "GET", f"{url}/v1/policies")
    assert status == 200
    assert {"id": "sanity/p.rego", "raw": "package sanity\nx := 1\n"} in body["result"]
    assert (await call(http, "GET", f"{url}/v1/data/sanity/x"))[1]["result"] == 1
    assert await call(http, "DELETE", f"{url}/v1/policies/sanity/p.rego") == (200, {})
    status, body = await call(http, "DELETE", f"{url}/v1/policies/sanity/p.rego")
    assert (status, body["code"]) == (404, "resource_not_found")


async def test_decisions_defined_and_undefined(url: str, http: aiohttp.ClientSession) -> None:
    assert (await call(http, "PUT", f"{url}/v1/policies/demo.rego", data=POLICY))[0] == 200
    status, body = await call(http, "POST", f"{url}/v1/data/demo/allow", json={"input": {"user": "alice"}})
    assert status == 200
    assert body["result"] is True
    assert isinstance(body["decision_id"], str)  # --decision-ids
    _, body = await call(http, "POST", f"{url}/v1/data/demo/allow", json={"input": {"user": "bob"}})
    assert body["result"] is False  # false is a value, not undefined
    status, body = await call(http, "POST", f"{url}/v1/data/demo/missing", json={"input": {}})
    assert status == 200
    assert "result" not in body  # undefined: 200 with no result key


async def test_undefined_is_an_empty_object_without_decision_ids(http: aiohttp.ClientSession) -> None:
    with opa_server() as base:
        assert await call(http, "POST", f"{base}/v1/data/nothing/here", json={"input": {}}) == (200, {})


async def test_policy_put_error_has_opas_shape(url: str, http: aiohttp.ClientSession) -> None:
    status, body = await call(http, "PUT", f"{url}/v1/policies/broken.rego", data="package broken\nallow if {{\n")
    assert status == 400
    assert body["code"] == "invalid_parameter"
    assert body["message"] == "error(s) occurred while compiling module(s)"
    [error] = body["errors"]
    assert error["code"] == "rego_parse_error"
    assert error["location"]["file"] == "broken.rego"
    assert isinstance(error["location"]["row"], int)

    status, body = await call(http, "PUT", f"{url}/v1/policies/typed.rego", data="package t\nallow if nope(1)\n")
    assert status == 400
    assert body["errors"][0]["code"] == "rego_type_error"
    assert "nope" in body["errors"][0]["message"]
    # A refused module is not kept: the list and the data document are as before.
    _, listed = await call(http, "GET", f"{url}/v1/policies")
    assert {p["id"] for p in listed["result"]}.isdisjoint({"broken.rego", "typed.rego"})


async def test_evaluation_error_is_a_500(url: str, http: aiohttp.ClientSession) -> None:
    assert (await call(http, "PUT", f"{url}/v1/policies/demo.rego", data=POLICY))[0] == 200
    status, body = await call(http, "POST", f"{url}/v1/data/demo/conflict", json={"input": {"a": 1, "b": 1}})
    assert status == 500
    assert body["code"] == "internal_error"
    assert body["errors"][0]["code"] == "eval_conflict_error"


async def test_data_put_and_get(url: str, http: aiohttp.ClientSession) -> None:
    assert await call(http, "PUT", f"{url}/v1/data/acl/teams", json={"red": ["alice"]}) == (204, None)
    _, body = await call(http, "GET", f"{url}/v1/data/acl")
    assert body["result"] == {"teams": {"red": ["alice"]}}
    _, body = await call(http, "GET", f"{url}/v1/data/acl/teams/red/0")  # integer segments index arrays
    assert body["result"] == "alice"


async def test_health(url: str, http: aiohttp.ClientSession) -> None:
    assert await call(http, "GET", f"{url}/health") == (200, {})


# -- the bundle plugin (--config-file): OPA's bundle service protocol against a recording bundle service ------------

BUNDLE_POLICY = "package t\n\nimport rego.v1\n\ndefault allow := false\n\nallow if input.user in data.t.users\n"


class BundleService:
    """A bundle service on a thread of its own (the stand-in must reach it while this test blocks): one bundle at
    /v1/bundles/authz with OPA's protocol (ETag, 304 on If-None-Match), a required Authorization value (else 401),
    and a record of every request: ``(Authorization, If-None-Match, status answered)``."""

    def __init__(self, authorization: str) -> None:
        self.authorization = authorization
        self.body: bytes | None = None
        self.etag = ""
        self.requests: list[tuple[str | None, str | None, int]] = []
        self._lock = threading.Lock()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with service._lock:
                    authorization = self.headers.get("Authorization")
                    if_none_match = self.headers.get("If-None-Match")
                    if self.path != "/v1/bundles/authz" or service.body is None:
                        status, body, etag = 404, b"", ""
                    elif authorization != service.authorization:
                        status, body, etag = 401, b"", ""
                    elif if_none_match == service.etag:
                        status, body, etag = 304, b"", service.etag
                    else:
                        status, body, etag = 200, service.body, service.etag
                    service.requests.append((authorization, if_none_match, status))
                self.send_response(status)
                if etag:
                    self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> BundleService:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def publish(self, body: bytes) -> str:
        with self._lock:
            self.body, self.etag = body, f'"{hashlib.sha256(body).hexdigest()}"'
            return self.etag

    def require(self, authorization: str) -> None:
        with self._lock:
            self.authorization = authorization

    def seen(self) -> list[tuple[str | None, str | None, int]]:
        with self._lock:
            return list(self.requests)


def raw_tarball(files: dict[str, str]) -> bytes:
    """A gzipped tarball of ``files`` as given, unchecked."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def bundle_bytes(
    tmp_path: Path, revision: str, users: list[str], policy: str = BUNDLE_POLICY, extra: dict[str, str] | None = None
) -> bytes:
    """A gzipped bundle owning root ``t``, built the way the config service builds them (``build_tarball``);
    ``extra``: more files, by name."""
    directory = tmp_path / f"bundle-{revision}"
    directory.mkdir()
    (directory / ".manifest").write_text(json.dumps({"revision": revision, "roots": ["t"]}))
    (directory / "t.rego").write_text(policy)
    for name, text in (extra or {}).items():
        (directory / name).write_text(text)
    (directory / "data.json").write_text(json.dumps({"t": {"users": users}}))
    build_tarball(directory, tmp_path / f"{revision}.tar.gz")
    return (tmp_path / f"{revision}.tar.gz").read_bytes()


def write_config(tmp_path: Path, port: int, credentials: dict[str, Any]) -> Path:
    """OPA's config: service ``cs`` on ``port``, bundle ``authz`` polled every second (OPA's smallest delay)."""
    config = {
        "services": {"cs": {"url": f"http://127.0.0.1:{port}/v1", "credentials": credentials}},
        "bundles": {
            "authz": {
                "service": "cs",
                "resource": "bundles/authz",
                "polling": {"min_delay_seconds": 1, "max_delay_seconds": 1},
            }
        },
        "decision_logs": {"console": True},  # an OPA section the stand-in accepts and ignores
    }
    path = tmp_path / "opa-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def http_json(method: str, url: str, body: object = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read() or b"null")


def decide(url: str, user: str) -> tuple[object, str | None]:
    """``(result, provenance revision of bundle authz)`` of ``data.t.allow`` for ``user``."""
    status, body = http_json("POST", f"{url}/v1/data/t/allow?provenance=true", {"input": {"user": user}})
    assert status == 200, body
    revision = body["provenance"].get("bundles", {}).get("authz", {}).get("revision")
    return body.get("result"), revision


def test_bundle_download_health_and_etag_protocol(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("t0ken\n")
    with BundleService("Bearer t0ken") as service:
        config = write_config(tmp_path, service.port, {"bearer": {"token_path": str(token_file)}})
        with opa_server(config_file=config, log_path=tmp_path / "opa.log") as url:
            # Nothing to download yet (404): serving, but not healthy for ?bundles, as OPA.
            wait_until(lambda: len(service.seen()) >= 1, timeout=6.0, interval=0.05, what="a first download attempt")
            assert http_json("GET", f"{url}/health") == (200, {})
            for query in ("bundles", "bundles=true", "bundles=TRUE"):
                assert http_json("GET", f"{url}/health?{query}") == (
                    500,
                    {"error": "one or more bundles are not activated"},
                )
            assert http_json("GET", f"{url}/health?bundles=false") == (200, {})
            assert decide(url, "alice") == (None, None)  # undefined: no policy, no bundle in provenance

            etag1 = service.publish(bundle_bytes(tmp_path, "r1", ["alice"]))
            wait_until(
                lambda: http_json("GET", f"{url}/health?bundles")[0] == 200,
                timeout=6.0,
                interval=0.05,
                what="bundle r1 activated",
            )
            assert decide(url, "alice") == (True, "r1")
            assert decide(url, "bob") == (False, "r1")
            # The policy id is OPA's: <bundle name>/<file in the bundle>.
            assert [p["id"] for p in http_json("GET", f"{url}/v1/policies")[1]["result"]] == ["authz/t.rego"]

            # Unchanged: every later poll sends the ETag back and gets a 304; the bundle was downloaded once.
            first_200 = next(i for i, r in enumerate(service.seen()) if r[2] == 200)
            wait_until(lambda: len(service.seen()) >= first_200 + 3, timeout=6.0, interval=0.05, what="two more polls")
            later = service.seen()[first_200 + 1 :]
            assert all(r == ("Bearer t0ken", etag1, 304) for r in later), later
            assert all(r[1] is None for r in service.seen()[:first_200])  # nothing to send before a download

            # Changed: the next poll gets the new bundle, which replaces the old one's data under its root.
            etag2 = service.publish(bundle_bytes(tmp_path, "r2", ["bob"]))
            wait_until(
                lambda: decide(url, "bob") == (True, "r2"), timeout=6.0, interval=0.05, what="bundle r2 activated"
            )
            assert decide(url, "alice") == (False, "r2")  # r1's users are gone, not merged
            n = len(service.seen())
            wait_until(lambda: len(service.seen()) > n, timeout=6.0, interval=0.05, what="a poll after r2")
            assert service.seen()[-1] == ("Bearer t0ken", etag2, 304)
        assert "bundle authz: activated revision 'r2'" in (tmp_path / "opa.log").read_text()


def test_token_path_is_read_on_every_request(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("one\n")
    with BundleService("Bearer one") as service:
        service.publish(bundle_bytes(tmp_path, "r1", ["alice"]))
        config = write_config(tmp_path, service.port, {"bearer": {"token_path": str(token_file)}})
        with opa_server(config_file=config, wait_for_bundles=True, log_path=tmp_path / "opa.log") as url:
            assert decide(url, "alice") == (True, "r1")
            # Rotate: the service now wants "two" and the file says so (whitespace around it is stripped, as OPA
            # does); no restart, and the new bundle gets through with the new token.
            service.require("Bearer two")
            token_file.write_text("  two \n")
            service.publish(bundle_bytes(tmp_path, "r2", ["bob"]))
            wait_until(
                lambda: decide(url, "bob") == (True, "r2"),
                timeout=6.0,
                interval=0.05,
                what="r2 downloaded with the rotated token",
            )
            assert any(r[0] == "Bearer two" and r[2] == 200 for r in service.seen())
            # A token file that is gone fails the download, and the activated bundle keeps serving.
            token_file.unlink()
            wait_until(
                lambda: "token_path" in (tmp_path / "opa.log").read_text(),
                timeout=6.0,
                interval=0.05,
                what="a failed download",
            )
            assert all(r[0] is not None for r in service.seen())  # no request went out without its credential
            assert decide(url, "bob") == (True, "r2")


def test_an_inline_token_and_scheme_are_sent_as_configured(tmp_path: Path) -> None:
    with BundleService("Token s3cret") as service:
        service.publish(bundle_bytes(tmp_path, "r1", ["alice"]))
        config = write_config(tmp_path, service.port, {"bearer": {"token": "s3cret", "scheme": "Token"}})
        with opa_server(config_file=config, wait_for_bundles=True):
            assert service.seen()[0][0] == "Token s3cret"


def test_a_broken_bundle_keeps_the_previous_one(tmp_path: Path) -> None:
    with BundleService("Bearer t") as service:
        etag1 = service.publish(bundle_bytes(tmp_path, "r1", ["alice"]))
        config = write_config(tmp_path, service.port, {"bearer": {"token": "t"}})
        log = tmp_path / "opa.log"
        with opa_server(config_file=config, wait_for_bundles=True, log_path=log) as url:
            assert decide(url, "alice") == (True, "r1")

            # Not a tarball: a download error. r1 keeps serving and the health stays good.
            garbage = service.publish(b"this is not a gzipped tarball")
            wait_until(
                lambda: "download failed" in log.read_text(),
                timeout=6.0,
                interval=0.05,
                what="the garbage to be refused",
            )
            assert decide(url, "alice") == (True, "r1")
            assert http_json("GET", f"{url}/health?bundles") == (200, {})
            # OPA resets its cache to the activated bundle's ETag: the broken one is fetched again, not skipped.
            n = len(service.seen())
            wait_until(lambda: len(service.seen()) > n, timeout=6.0, interval=0.05, what="the next poll")
            assert service.seen()[-1][1:] == (etag1, 200)
            assert garbage not in {r[1] for r in service.seen()}

            # Parses, but does not compile (an unknown function): an activation error, r1 still serving.
            service.publish(bundle_bytes(tmp_path, "r2", ["bob"], "package t\n\nallow if nope(input.user)\n"))
            wait_until(
                lambda: "activation failed" in log.read_text(), timeout=6.0, interval=0.05, what="r2 to be refused"
            )
            assert decide(url, "alice") == (True, "r1")
            assert decide(url, "bob") == (False, "r1")  # r2's data was not written either
            assert "rego_type_error" in log.read_text()

            # A test module is a module to OPA: outside the roots, it gets the bundle refused. meshgate's loader
            # refuses it too (so build_tarball cannot make it): a hand-made tarball, as another tool might.
            outside = {
                ".manifest": json.dumps({"revision": "r3", "roots": ["t"]}),
                "t.rego": BUNDLE_POLICY,
                "t_test.rego": "package other_test\n\nimport rego.v1\n\ntest_x if true\n",
                "data.json": json.dumps({"t": {"users": ["bob"]}}),
            }
            service.publish(raw_tarball(outside))
            wait_until(
                lambda: "outside the manifest roots" in log.read_text(),
                timeout=6.0,
                interval=0.05,
                what="r3 to be refused",
            )
            assert decide(url, "bob") == (False, "r1")

            # Fixed: the next good bundle is activated, its test module with it (OPA loads *_test.rego too).
            inside = {"t_test.rego": "package t.tests\n\nimport rego.v1\n\ntest_x if true\n"}
            service.publish(bundle_bytes(tmp_path, "r4", ["bob"], extra=inside))
            wait_until(lambda: decide(url, "bob") == (True, "r4"), timeout=6.0, interval=0.05, what="r4 activated")
            policies = {p["id"] for p in http_json("GET", f"{url}/v1/policies")[1]["result"]}
            assert policies == {"authz/t.rego", "authz/t_test.rego"}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"services": {"a": {"url": "http://x"}}, "bundles": {"b": {"service": "nope"}}},
            'invalid service name "nope" in bundle "b"',
        ),
        (
            {"services": {"a": {"url": "http://x"}}, "bundles": {"b": {"polling": {"min_delay_seconds": 0.5}}}},
            "bundles.b.polling.min_delay_seconds: must be an integer number of seconds, not 0.5",
        ),
        (
            {
                "services": {"a": {"url": "http://x"}},
                "bundles": {"b": {"polling": {"min_delay_seconds": 5, "max_delay_seconds": 2}}},
            },
            "max polling delay must be >= min polling delay",
        ),
        (
            {"services": {"a": {"url": "http://x", "credentials": {"bearer": {"token": "t", "token_path": "/f"}}}}},
            'specify a value for either the "token" or "token_path" field',
        ),
        (
            {"services": {"a": {"url": "http://x", "credentials": {"oauth2": {}}}}},
            "credentials.oauth2: not implemented",
        ),
        (
            {"services": {"a": {"url": "http://x"}}, "bundles": {"b": {"signing": {"keyid": "k"}}}},
            "bundles.b.signing: not implemented",
        ),
    ],
)
def test_a_config_it_cannot_honour_stops_it_at_start(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "tests.opa_server", "--listen", f"127.0.0.1:{free_port()}", "--config-file", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert message in result.stderr
