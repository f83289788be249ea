"""e2e: the compose stack's OPA path, without Docker.

In compose, the ``opa`` service pulls bundle ``authz`` from the config service (compose/opa/config.yaml) and the
payments sidecar, seeded with ``authz: {engine: opa, opa_url: http://opa:8181}``, asks it for every decision.
``meshgate demo`` cannot show that path (no OPA server here: it runs the embedded engine instead), so this test runs
it with the OPA stand-in (``tests/opa_server.py``: OPA's REST and bundle-plugin behaviour on the real OPA engine)
driven by compose's own OPA config file.

Everything is read from compose/ as compose wires it -- the config service's ``--seed`` and ``--tokens`` and the
mounts behind them, OPA's ``--config-file`` and its token mount, the sidecar's bootstrap and token mount -- and
only addresses and host paths are rewritten (each rewrite asserts the value it replaces, so a change in compose's
shape fails here instead of being papered over). Nothing here listens on the demo's fixed ports.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config.document import load_text
from gateway.demo.topology import localize
from policy.bundle import build_tarball
from tests.configservice_proc import ConfigService
from tests.opa_server import opa_server
from tests.procs import ROOT, free_port, gateway, log_events, stop, upstream, wait_http, wait_until

pytestmark = pytest.mark.e2e

COMPOSE = ROOT / "compose"
# The shipped policy's denial for a principal without the route's roles (policy/rego/authz.rego, data.json).
BOB_DENIED = "one of roles payments.read, orders.admin required for GET on route payments-read"


# -- reading compose as compose reads it ------------------------------------------------------------------------------


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]
    return services


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """A compose service's bind mounts, container path -> host path (short syntax ``./src:/dst[:ro]``, relative to
    the compose file); named volumes are left out."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[target] = (COMPOSE / source).resolve()
    return mounts


def flag(command: list[str], name: str) -> str:
    """The value after ``name`` in a compose ``command`` list."""
    assert name in command, (name, command)
    return command[command.index(name) + 1]


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def repoint(value: str, compose_port: int, port: int) -> str:
    """``value`` (an address or URL from compose) with its compose host localized, and its compose port -- which it
    must have -- replaced by ``port``."""
    local: str = localize(value)
    assert f"127.0.0.1:{compose_port}" in local, (value, compose_port)
    return local.replace(f"127.0.0.1:{compose_port}", f"127.0.0.1:{port}")


# -- small clients ----------------------------------------------------------------------------------------------------


def http(
    method: str, url: str, *, token: str | None = None, body: object = None, raw: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/gzip" if raw is not None else "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


@contextmanager
def idp(port: int) -> Iterator[str]:
    """The demo IdP (``python -m gateway.demo.idp``, as compose runs it) on ``port``."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway.demo.idp", "--listen", f"127.0.0.1:{port}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/.well-known/jwks.json", process=process)
        yield url
    finally:
        stop(process)


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON object lines of a process's log (anything else, e.g. a traceback, is skipped)."""
    lines = []
    for text in path.read_text().splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines


def opa_revision(opa_url: str) -> str | None:
    """The revision of bundle ``authz`` OPA reports in a decision's provenance (what the remote engine reads)."""
    status, _, body = http("POST", f"{opa_url}/v1/data/meshgate/authz/allow?provenance=true", body={"input": {}})
    assert status == 200, body
    revision: str | None = json.loads(body)["provenance"].get("bundles", {}).get("authz", {}).get("revision")
    return revision


# -- the test ---------------------------------------------------------------------------------------------------------


def test_opa_pulls_the_bundle_from_the_config_service_and_decides_for_payments(tmp_path: Path) -> None:
    services = compose_services()
    with ExitStack() as stack:
        # ---- the config service, with compose's --tokens and the --seed directory as compose mounts it
        configservice = services["configservice"]
        cs_command, cs_mounts = configservice["command"], bind_mounts(configservice)
        compose_cs_port = port_of(flag(cs_command, "--listen"))
        seed_target = flag(cs_command, "--seed")
        seed = tmp_path / "seed"
        for target, source in cs_mounts.items():
            if target.startswith(seed_target + "/"):
                shutil.copytree(source, seed / Path(target).relative_to(seed_target))
        assert (seed / "bundles" / "authz" / "authz.rego").is_file()  # policy/rego, mounted as bundle "authz"
        compose_tokens = cs_mounts[flag(cs_command, "--tokens")]
        tokens = yaml.safe_load(compose_tokens.read_text())["tokens"]
        admin = next(entry["token"] for entry in tokens if entry["role"] == "admin")
        cs = ConfigService(free_port(), tmp_path / "cs-data", tmp_path / "configservice.log", ["--seed", str(seed)])
        shutil.copy(compose_tokens, cs.tokens_file)  # where ConfigService passes --tokens from
        cs.start()
        stack.callback(cs.stop)

        # ---- OPA, on compose's config file: only the config service's address, the token's host path and (for
        # time) the polling delays are rewritten
        opa = services["opa"]
        opa_mounts = bind_mounts(opa)
        compose_opa_port = port_of(flag(opa["command"], "--addr"))
        opa_config = yaml.safe_load(opa_mounts[flag(opa["command"], "--config-file")].read_text())
        bundle = opa_config["bundles"]["authz"]
        service = opa_config["services"][bundle["service"]]
        assert service["url"].endswith("/v1")  # the config service's API root; resource: bundles/authz
        service["url"] = repoint(service["url"], compose_cs_port, cs.port)
        bearer = service["credentials"]["bearer"]
        bearer["token_path"] = str(opa_mounts[bearer["token_path"]])  # compose/tokens/opa.token
        # compose polls every 5-10 s; every 1 s (OPA's smallest delay, it takes whole seconds) keeps this test short.
        polling = bundle["polling"]
        assert polling["min_delay_seconds"] <= polling["max_delay_seconds"]
        polling.update(min_delay_seconds=1, max_delay_seconds=1)
        opa_config_path = tmp_path / "opa-config.yaml"
        opa_config_path.write_text(yaml.safe_dump(opa_config, sort_keys=False))
        opa_url = stack.enter_context(
            opa_server(config_file=opa_config_path, wait_for_bundles=True, log_path=tmp_path / "opa.log")
        )
        revision = json.loads((seed / "bundles" / "authz" / ".manifest").read_text())["revision"]
        assert opa_revision(opa_url) == revision

        # ---- the rest of the payments side: IdP, two app instances
        compose_idp_port = port_of(flag(services["idp"]["command"], "--listen"))
        idp_url = stack.enter_context(idp(free_port()))
        app_ports = [stack.enter_context(upstream(name)) for name in ("payments-a", "payments-b")]

        # ---- the seeded payments config, pushed with its addresses made local: the rest is as seeded
        # Read as the config service reads a seed (its strict loader: `on:` is a key there, not YAML 1.1's true).
        seeded = load_text((seed / "services" / "payments.yaml").read_text())
        pushed: dict[str, Any] = localize(seeded)
        authz = pushed["authz"]
        assert authz["engine"] == "opa"
        authz["opa_url"] = repoint(authz["opa_url"], compose_opa_port, port_of(opa_url))
        jwt = pushed["authn"]["jwt"]
        jwt["jwks_url"] = repoint(jwt["jwks_url"], compose_idp_port, port_of(idp_url))
        [cluster] = [c for c in pushed["clusters"] if c["name"] == "payments"]
        assert len(cluster["endpoints"]) == 2
        cluster["endpoints"] = [f"127.0.0.1:{port}" for port in app_ports]
        status, _, body = http("PUT", f"{cs.url}/v1/services/payments/config", token=admin, body=pushed)
        assert status == 201, body
        version = json.loads(body)["version"]

        # ---- the payments sidecar on compose's bootstrap: its addresses local, its token compose's file
        sidecar = services["payments-sidecar"]
        sidecar_mounts = bind_mounts(sidecar)
        bootstrap: dict[str, Any] = localize(yaml.safe_load(sidecar_mounts[flag(sidecar["command"], "-c")].read_text()))
        bootstrap["listen"] = repoint(bootstrap["listen"], port_of(bootstrap["listen"]), free_port())
        bootstrap["admin"] = repoint(bootstrap["admin"], port_of(bootstrap["admin"]), free_port())
        settings = bootstrap["config_service"]
        settings["url"] = repoint(settings["url"], compose_cs_port, cs.port)
        settings["token_file"] = str(sidecar_mounts[settings["token_file"]])  # compose/tokens/payments.token
        del bootstrap["telemetry"]["tracing"]  # no trace collector here: spans are simply not exported
        gw_dir = tmp_path / "sidecar"
        gw_dir.mkdir()
        gw = stack.enter_context(gateway(gw_dir, bootstrap))
        pid = gw.process.pid
        ready = json.loads(http("GET", f"{gw.admin_url}/readyz")[2])
        assert (ready["source"], ready["version"]) == ("config_service", version)

        def token(query: str) -> str:
            status, _, body = http("GET", f"{idp_url}/token?{query}")
            assert status == 200, body
            return body.decode().strip()

        def decision_log(decision_id: str) -> dict[str, Any]:
            found = wait_until(
                lambda: [e for e in log_events(gw, "decision") if e.get("decision_id") == decision_id],
                timeout=5,
                interval=0.05,
                what=f"the decision log line of {decision_id}",
            )
            line: dict[str, Any] = found[0]
            return line

        alice, bob = token("sub=alice&roles=payments.read"), token("sub=bob")

        # ---- decisions come from OPA, on the bundle it pulled
        status, headers, body = http("GET", f"{gw.url}/payments/p-1", token=alice)
        assert status == 200, body
        assert json.loads(body)["instance"] in ("payments-a", "payments-b")
        line = decision_log(headers["x-decision-id"])
        assert (line["engine"], line["bundle_revision"], line["outcome"]) == ("opa", revision, "allow")

        status, headers, body = http("GET", f"{gw.url}/payments/p-1", token=bob)
        assert status == 403, body
        assert json.loads(body)["message"] == BOB_DENIED
        line = decision_log(headers["x-decision-id"])
        assert (line["engine"], line["bundle_revision"], line["outcome"]) == ("opa", revision, "deny")
        assert line["result"]["reason"] == BOB_DENIED

        # ---- a new bundle "authz" pushed to the config service reaches OPA by polling, and bob's decision flips
        # with no gateway restart: payments-read GET now admits any verified principal
        changed = tmp_path / "authz-changed"
        shutil.copytree(seed / "bundles" / "authz", changed)
        data = json.loads((changed / "data.json").read_text())
        data["meshgate"]["access"]["routes"]["payments-read"]["GET"] = []
        (changed / "data.json").write_text(json.dumps(data))
        manifest = json.loads((changed / ".manifest").read_text())
        new_revision = manifest["revision"] = f"{revision}-compose-e2e"
        (changed / ".manifest").write_text(json.dumps(manifest))
        build_tarball(changed, tmp_path / "authz-changed.tar.gz")
        raw = (tmp_path / "authz-changed.tar.gz").read_bytes()
        status, _, body = http("PUT", f"{cs.url}/v1/bundles/authz", token=admin, raw=raw)
        assert status == 201, body
        assert json.loads(body)["revision"] == new_revision

        # Within the (rewritten) max polling delay, plus time for a download and a compile.
        max_delay = polling["max_delay_seconds"]
        wait_until(
            lambda: opa_revision(opa_url) == new_revision,
            timeout=max_delay + 3,
            interval=0.05,
            what="OPA to activate the new bundle",
        )

        status, headers, body = http("GET", f"{gw.url}/payments/p-2", token=bob)
        assert status == 200, body
        line = decision_log(headers["x-decision-id"])
        assert (line["engine"], line["bundle_revision"], line["outcome"]) == ("opa", new_revision, "allow")
        assert line["result"]["reason"] == "GET on route payments-read is open to any authenticated principal"
        assert gw.process.pid == pid
        assert gw.process.poll() is None
        ready = json.loads(http("GET", f"{gw.admin_url}/readyz")[2])
        assert ready["version"] == version  # same config, same process: only OPA's bundle changed

    # Every bundle download was OPA's, made with compose/tokens/opa.token (the config service names the caller by
    # its token's entry in compose/tokens.yaml), and both revisions were downloaded.
    downloads = [
        line
        for line in json_lines(tmp_path / "configservice.log")
        if line.get("event") == "request" and line.get("method") == "GET" and line.get("path") == "/v1/bundles/authz"
    ]
    assert {line["caller"] for line in downloads} == {"opa"}
    assert [line["status"] for line in downloads].count(200) == 2, downloads
    assert {line["status"] for line in downloads} <= {200, 304}
    opa_log = (tmp_path / "opa.log").read_text()
    assert f"bundle authz: activated revision {revision!r}" in opa_log
    assert f"bundle authz: activated revision {new_revision!r}" in opa_log
