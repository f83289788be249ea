"""What the files compose/docker-compose.yml mounts say agrees with the compose file: checked without Docker.

What `docker compose up` would only tell at run time, minutes in, or never (a dashboard that stays empty): an
address that names no service or a port nobody listens on, a bootstrap ``meshgate check`` refuses, a token the
config service does not know or with the wrong role, a Prometheus target on the wrong port, OPA asking for a bundle
path the config service does not serve, a gateway asking OPA before it is up, a seed the config service does not
see, Grafana provisioning pointing where nothing is mounted.

Every path and port is derived from the compose file and the files it mounts (a container path is resolved to the
host file through the service's mounts, in ``tests/compose_files.py``), not copied here. The compose file itself
(services, mounts, images, ports, network namespaces) is checked in ``test_compose_file.py``. Each failure names
the service and the problem. The seeded configs' validity, and that the same files drive ``meshgate demo``, are
checked by the demo's own tests.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config.errors import ConfigError
from gateway.configservice.auth import TokenSet, load_tokens
from tests import compose_files as cf

# host:port, bare or as an http(s) URL: the addresses a config can point at.
ADDRESS = re.compile(r"(?:https?://)?(?P<host>[A-Za-z][A-Za-z0-9.-]*|\d+\.\d+\.\d+\.\d+):(?P<port>\d+)(?:/\S*)?")
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "0.0.0.0", "::1"})  # the process's own host: not checked
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


# ---------------------------------------------------------------------------------------------------- addresses


def test_addresses_in_the_mounted_configs_point_at_services_that_listen_there() -> None:
    """Every host:port in a bootstrap, a seeded service config, the OPA config and the Grafana data sources names a
    compose service (reachable by that name) and a port that service listens on."""
    sources: list[tuple[str, Any]] = [
        (cf.rel(cf.gateway(name).bootstrap), cf.gateway(name).document) for name in cf.gateway_services()
    ]
    seed = cf.seed_dir()
    if seed is not None and (seed / "services").is_dir():
        sources += [(cf.rel(path), cf.yaml_file(path)) for path in sorted((seed / "services").glob("*.yaml"))]
    sources.append((cf.rel(cf.opa_config_file()), cf.yaml_file(cf.opa_config_file())))
    grafana = cf.grafana_provisioning()
    if grafana is not None:
        sources += [(cf.rel(path), cf.yaml_file(path)) for path in sorted((grafana / "datasources").glob("*.yaml"))]
    services = cf.services()
    problems: list[str] = []
    for where, document in sources:
        for text in cf.strings(document):
            match = ADDRESS.fullmatch(text.strip())
            if match is None or match["host"] in LOCAL_HOSTS:
                continue
            host, port = match["host"], int(match["port"])
            if host not in services:
                problems.append(f"{where}: {text} names {host!r}, which is not a compose service")
            elif owner := cf.netns_owner(host):
                problems.append(f"{where}: {text}: {host} has no address of its own (it shares {owner}'s); use {owner}")
            elif port not in cf.listening(host):
                problems.append(f"{where}: {text}: {host} listens on {sorted(cf.listening(host))}, not {port}")
            elif cf.environment(host).get("BIND") in LOOPBACK and cf.environment(host).get("PORT") == str(port):
                problems.append(f"{where}: {text}: {host} binds {port} on loopback only (BIND), unreachable from here")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------- gateways


@pytest.mark.parametrize("sidecar", cf.SIDECARS)
def test_the_mounted_bootstrap_passes_meshgate_check(sidecar: str, tmp_path: Path) -> None:
    """`meshgate check` as the container would run it. The bootstrap names container paths (token_file is
    /etc/meshgate/tokens/<svc>.token), which do not exist here: a copy with every path the service mounts pointed at
    its host file is checked instead. A container path nothing mounts stays as it is, and fails the check."""
    gateway = cf.gateway(sidecar)

    def to_host(node: object) -> object:
        if isinstance(node, Mapping):
            return {key: to_host(value) for key, value in node.items()}
        if isinstance(node, list):
            return [to_host(value) for value in node]
        if isinstance(node, str) and node.startswith("/"):
            host = cf.resolve(sidecar, node)
            return str(host) if host is not None else node
        return node

    copy = tmp_path / gateway.bootstrap.name
    copy.write_text(yaml.safe_dump(to_host(gateway.document), sort_keys=False), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "-c", str(copy)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{sidecar}: meshgate check refuses {cf.rel(gateway.bootstrap)}:\n{done.stderr}"


def _config_service_tokens() -> TokenSet:
    tokens = cf.flag(cf.command("configservice"), "--tokens")
    assert tokens, "configservice: no --tokens (the demo tokens must be the fixed ones the sidecars and OPA hold)"
    host = cf.host_file("configservice", tokens, "--tokens")
    try:
        return load_tokens(host)
    except ConfigError as error:
        pytest.fail(f"configservice: {cf.rel(host)} is not a valid tokens file:\n{error}")


def _token_in(name: str, container_path: str) -> tuple[str, str]:
    host = cf.resolve(name, container_path)
    assert host is not None, f"{name}: token file {container_path} is not mounted"
    assert host.is_file(), f"{name}: token file {container_path} is mounted from {cf.rel(host)}, which does not exist"
    return host.read_text(encoding="utf-8").strip(), cf.rel(host)


def test_the_mounted_tokens_are_known_to_the_config_service_with_the_right_role() -> None:
    tokens = {token.secret: token for token in _config_service_tokens().tokens}
    problems: list[str] = []
    for name in cf.gateway_services():
        gateway = cf.gateway(name)
        token_file = str((gateway.document.get("config_service") or {}).get("token_file") or "")
        if not token_file:
            problems.append(f"{name}: its bootstrap has no config_service.token_file")
            continue
        secret, where = _token_in(name, token_file)
        token = tokens.get(secret)
        service = gateway.document.get("service")
        if token is None:
            problems.append(f"{name}: the token in {where} is not in the config service's tokens file")
        elif token.role != "gateway":
            problems.append(f"{name}: the token in {where} ({token.name}) has role {token.role}, expected gateway")
        elif token.service not in (None, service):
            problems.append(f"{name}: the token in {where} ({token.name}) is bound to {token.service}, not {service}")
    opa_token = ((_opa_config().get("services") or {}).get(_opa_bundle()["service"]) or {}).get("credentials", {})
    token_path = (opa_token.get("bearer") or {}).get("token_path")
    if not token_path:
        problems.append("opa: no services.<bundle service>.credentials.bearer.token_path in its config")
    else:
        secret, where = _token_in("opa", str(token_path))
        token = tokens.get(secret)
        if token is None:
            problems.append(f"opa: the token in {where} is not in the config service's tokens file")
        elif token.role != "gateway":
            # OPA only downloads bundles: a read-only token is enough, an admin one could push.
            problems.append(f"opa: the token in {where} ({token.name}) has role {token.role}, expected gateway")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------- prometheus


def test_prometheus_scrapes_every_gateway_admin_port_and_the_config_service() -> None:
    command = cf.command("prometheus")
    config = cf.flag(command, "--config.file")
    assert config, "prometheus: no --config.file"
    host = cf.host_file("prometheus", config, "--config.file")
    assert "--enable-feature=exemplar-storage" in command, "prometheus: exemplar storage off: no trace links"
    targets: dict[str, dict[str, str]] = {}
    for job in cf.yaml_file(host).get("scrape_configs") or []:
        for static in job.get("static_configs") or []:
            for target in static.get("targets") or []:
                targets[str(target)] = {"job": str(job.get("job_name")), **(static.get("labels") or {})}
    expected: dict[str, str] = {}
    for name in cf.gateway_services():
        document = cf.gateway(name).document
        reach = cf.netns_owner(name) or name
        expected[f"{reach}:{cf.port_of(str(document['admin']))}"] = str(document["service"])
    listen = cf.flag(cf.command("configservice"), "--listen") or "127.0.0.1:7000"
    expected[f"configservice:{cf.port_of(listen)}"] = "configservice"
    problems: list[str] = []
    for target, service in expected.items():
        if target not in targets:
            problems.append(f"prometheus: {cf.rel(host)} does not scrape {target} ({service})")
        elif targets[target].get("service") != service:
            problems.append(
                f"prometheus: target {target} has label service={targets[target].get('service')!r}, "
                f"the dashboards expect {service!r}"
            )
    for target in targets:
        if ADDRESS.fullmatch(target) and target not in expected:
            host_name, port = target.rsplit(":", 1)
            if host_name not in cf.services() or int(port) not in cf.listening(host_name):
                problems.append(f"prometheus: target {target} is not an admin or metrics port in the topology")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------- OPA


def _opa_config() -> Mapping[str, Any]:
    document = cf.yaml_file(cf.opa_config_file())
    assert isinstance(document, Mapping), f"opa: {cf.rel(cf.opa_config_file())} is not a mapping"
    return document


def _opa_bundle() -> Mapping[str, Any]:
    bundle = (_opa_config().get("bundles") or {}).get("authz")
    assert isinstance(bundle, Mapping), f"opa: {cf.rel(cf.opa_config_file())} has no bundles.authz"
    return bundle


def test_opa_pulls_the_authz_bundle_from_the_config_service() -> None:
    bundle = _opa_bundle()
    service = (_opa_config().get("services") or {}).get(bundle.get("service"))
    assert isinstance(service, Mapping), f"opa: bundles.authz.service {bundle.get('service')!r} is not in services"
    url = f"{str(service['url']).rstrip('/')}/{str(bundle.get('resource', '')).lstrip('/')}"
    listen = cf.flag(cf.command("configservice"), "--listen") or "127.0.0.1:7000"
    expected = f"http://configservice:{cf.port_of(listen)}/v1/bundles/authz"
    assert url == expected, f"opa: bundle authz is fetched from {url}; the config service serves it at {expected}"
    depends = cf.service("opa").get("depends_on") or {}
    assert "configservice" in depends, "opa: does not wait for the config service it pulls from"


def test_every_gateway_that_asks_opa_waits_for_it() -> None:
    problems: list[str] = []
    seed = cf.seed_dir()
    configs = {path.stem: cf.yaml_file(path) for path in sorted((seed / "services").glob("*.yaml"))} if seed else {}
    for name in cf.gateway_services():
        service = str(cf.gateway(name).document.get("service"))
        authz = (configs.get(service) or {}).get("authz") or {}
        if authz.get("engine") != "opa":
            continue
        depends = cf.service(name).get("depends_on") or {}
        condition = (depends.get("opa") or {}).get("condition") if isinstance(depends, Mapping) else None
        if condition != "service_healthy":
            problems.append(f"{name}: {service} asks OPA (authz.engine opa) but does not wait for opa to be healthy")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------- seed


def test_the_config_service_sees_the_whole_seed_and_the_shipped_policy_as_bundle_authz() -> None:
    seed = cf.flag(cf.command("configservice"), "--seed")
    assert seed, "configservice: no --seed"
    host_seed = cf.seed_dir()
    assert host_seed is not None, "compose/seed does not exist"
    expected = {f"{seed}/services": host_seed / "services", f"{seed}/bundles/authz": cf.ROOT / "policy" / "rego"}
    bundles = host_seed / "bundles"
    if bundles.is_dir():  # a bundle is a directory or NAME.tar.gz; --seed skips hidden names
        expected |= {
            f"{seed}/bundles/{path.name}": path for path in sorted(bundles.iterdir()) if not path.name.startswith(".")
        }
    problems = [
        f"configservice: {container} should be {cf.rel(host)}, is "
        f"{cf.rel(resolved) if (resolved := cf.resolve('configservice', container)) else 'not mounted'}"
        for container, host in expected.items()
        if cf.resolve("configservice", container) != host.resolve()
    ]
    if (bundles / "authz").exists() or (bundles / "authz.tar.gz").exists():
        problems.append("compose/seed/bundles/authz: the bundle authz is the shipped policy/rego; rename this one")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------- grafana


def test_grafana_provisioning_is_mounted_where_grafana_and_the_providers_look() -> None:
    provisioning = cf.grafana_provisioning()
    assert provisioning is not None, "grafana: nothing from the host is mounted at its provisioning path"
    assert provisioning.is_dir(), f"grafana: its provisioning is mounted from {cf.rel(provisioning)}, not a directory"
    problems: list[str] = []
    providers_files = sorted((provisioning / "dashboards").glob("*.yaml"))
    if not providers_files:
        problems.append(f"grafana: no dashboard providers in {cf.rel(provisioning / 'dashboards')}")
    for path in providers_files:
        for provider in cf.yaml_file(path).get("providers") or []:
            folder = str((provider.get("options") or {}).get("path") or "")
            host = cf.resolve("grafana", folder) if folder else None
            if host is None:
                problems.append(f"grafana: {cf.rel(path)} reads dashboards from {folder!r}, where nothing is mounted")
            elif not any(host.glob("*.json")):
                problems.append(f"grafana: {cf.rel(path)} reads {folder}, mounted from {cf.rel(host)}: no *.json there")
    assert not problems, "\n".join(problems)
