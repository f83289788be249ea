"""compose/docker-compose.yml and the files it mounts agree with each other: checked without Docker, without a network.

What `docker compose up` would only tell at run time, minutes in, or never (a dashboard that stays empty): a
mounted file that is not there, an image tag that moves, a sidecar whose listener nobody publishes, a
``service_healthy`` wait on a service without a healthcheck, a bootstrap ``meshgate check`` refuses, a token the
config service does not know, a Prometheus target on the wrong port, OPA asking for a bundle path the config service
does not serve, Grafana provisioning pointing where nothing is mounted.

Every path and port is derived from the compose file and the files it mounts (a container path is resolved to the
host file through the service's mounts), not copied here; the tables below are what the demo topology fixes (which
services exist, which ports are published, which sidecar sits in which app's network namespace). Each failure names
the service and the problem. The seeded configs' validity, and that the same files drive ``meshgate demo``, are
checked by the demo's own tests.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from gateway.config.errors import ConfigError
from gateway.configservice.auth import TokenSet, load_tokens

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"

# The demo topology: service -> (host ports it must publish, host ports it may publish). Every other port
# stays on the compose network.
PUBLISHED: Mapping[str, tuple[frozenset[int], frozenset[int]]] = {
    "configservice": (frozenset({7000}), frozenset()),
    "idp": (frozenset({7777}), frozenset()),
    "orders": (frozenset({8081}), frozenset()),  # the orders sidecar's listener (it shares orders' netns)
    "orders-sidecar": (frozenset(), frozenset()),
    "payments": (frozenset({8082}), frozenset()),
    "payments-b": (frozenset(), frozenset()),
    "payments-sidecar": (frozenset(), frozenset()),
    "opa": (frozenset(), frozenset()),
    "jaeger": (frozenset({16686}), frozenset({4318})),
    "prometheus": (frozenset({9090}), frozenset()),
    "grafana": (frozenset({3000}), frozenset()),
    "redis": (frozenset(), frozenset()),
    "traffic": (frozenset(), frozenset()),
}
# Gateway sidecar -> the app service whose network namespace it joins.
SIDECARS: Mapping[str, str] = {"orders-sidecar": "orders", "payments-sidecar": "payments"}
# Services only `--profile NAME` starts.
PROFILES: Mapping[str, str] = {"traffic": "traffic"}

# What third-party images listen on by their own defaults (nothing in this repository says it).
IMAGE_PORTS: Mapping[str, frozenset[int]] = {
    "jaegertracing/jaeger": frozenset({4317, 4318, 16686, 13133}),
    "prom/prometheus": frozenset({9090}),
    "grafana/grafana": frozenset({3000}),
    "redis": frozenset({6379}),
}
# An exact release: 1.2.3, v3.7.3, 7.4.6-alpine, 3.11.13-slim-bookworm; never latest, never 1 or 1.2.
EXACT_TAG = re.compile(r"v?\d+\.\d+\.\d+(?:[.-][A-Za-z0-9._-]+)?")
# host:port, bare or as an http(s) URL: the addresses a config can point at.
ADDRESS = re.compile(r"(?:https?://)?(?P<host>[A-Za-z][A-Za-z0-9.-]*|\d+\.\d+\.\d+\.\d+):(?P<port>\d+)(?:/\S*)?")
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "0.0.0.0", "::1"})  # the process's own host: not checked
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
CONDITIONS = frozenset({"service_started", "service_healthy", "service_completed_successfully"})


# ---------------------------------------------------------------------------------------------------- reading


@functools.cache
def _compose() -> Mapping[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, Mapping), f"{COMPOSE_FILE}: expected a mapping at the top level"
    return document


def _services() -> Mapping[str, Mapping[str, Any]]:
    services = _compose().get("services")
    assert isinstance(services, Mapping), f"{COMPOSE_FILE}: no services mapping"
    assert services, f"{COMPOSE_FILE}: no services"
    return services


def _service(name: str) -> Mapping[str, Any]:
    services = _services()
    assert name in services, f"{name}: not defined in {COMPOSE_FILE.name}"
    return services[name]


def _command(name: str) -> list[str]:
    command = _service(name).get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _flag(command: list[str], *flags: str) -> str | None:
    """The value of the first of ``flags`` in ``command`` (``--flag value`` or ``--flag=value``)."""
    for index, part in enumerate(command):
        for flag in flags:
            if part == flag and index + 1 < len(command):
                return command[index + 1]
            if part.startswith(flag + "="):
                return part.split("=", 1)[1]
    return None


def _port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def _environment(name: str) -> dict[str, str]:
    environment = _service(name).get("environment") or {}
    if isinstance(environment, Mapping):
        return {str(key): str(value) for key, value in environment.items()}
    return dict(str(entry).partition("=")[::2] for entry in environment)


def _netns_owner(name: str) -> str | None:
    mode = str(_service(name).get("network_mode") or "")
    return mode.removeprefix("service:") if mode.startswith("service:") else None


def _image_repo(image: str) -> tuple[str, str | None]:
    """``repo[:tag][@digest]`` -> (repo, tag); a registry's ``host:port/`` is part of the repo."""
    image = image.split("@", 1)[0]
    slash = image.rfind("/")
    if ":" in image[slash + 1 :]:
        repo, _, tag = image.rpartition(":")
        return repo, tag
    return image, None


@dataclass(frozen=True, slots=True)
class Mount:
    target: str  # the container path
    source: Path | None  # the host path of a bind mount; None for a volume
    volume: str | None  # the named volume's name; None for a bind mount or an anonymous volume
    read_only: bool
    spec: str  # as written, for messages


def _mounts(name: str) -> list[Mount]:
    mounts: list[Mount] = []
    for entry in _service(name).get("volumes") or []:
        if isinstance(entry, str):
            parts = entry.split(":")
            if len(parts) == 1:  # a lone container path: an anonymous volume
                mounts.append(Mount(parts[0], None, None, False, entry))
                continue
            source, target = parts[0], parts[1]
            read_only = len(parts) > 2 and "ro" in parts[2].split(",")
        else:
            source, target = str(entry.get("source") or ""), str(entry["target"])
            read_only = bool(entry.get("read_only"))
        is_bind = source.startswith((".", "/", "~"))
        host = (COMPOSE_DIR / Path(source).expanduser()).resolve() if is_bind else None
        volume = source if source and not is_bind else None
        mounts.append(Mount(target.rstrip("/") or "/", host, volume, read_only, str(entry)))
    return mounts


def _resolve(name: str, container_path: str) -> Path | None:
    """The host path behind ``container_path`` in service ``name``: through the innermost mount that holds it;
    None when no bind mount does (the image's own file system, or a volume)."""
    path = PurePosixPath(container_path)
    holders = [m for m in _mounts(name) if path == PurePosixPath(m.target) or PurePosixPath(m.target) in path.parents]
    if not holders:
        return None
    innermost = max(holders, key=lambda m: len(PurePosixPath(m.target).parts))
    if innermost.source is None:
        return None
    return innermost.source.joinpath(*path.relative_to(innermost.target).parts)


def _host_file(name: str, container_path: str, what: str) -> Path:
    """The host file mounted at ``container_path`` (``what`` names it in messages)."""
    host = _resolve(name, container_path)
    assert host is not None, f"{name}: {what} {container_path} is not mounted from the host"
    assert host.is_file(), f"{name}: {what} {container_path} is mounted from {_rel(host)}, which does not exist"
    return host


def _has_healthcheck(name: str) -> bool:
    check = _service(name).get("healthcheck")
    if not isinstance(check, Mapping) or check.get("disable"):
        return False
    test = check.get("test")
    return bool(test) and test != ["NONE"]


def _published(name: str) -> list[tuple[str, int, int, str]]:
    """(host ip, host port, container port, protocol) for every published port of ``name``."""
    published: list[tuple[str, int, int, str]] = []
    for entry in _service(name).get("ports") or []:
        if isinstance(entry, Mapping):
            if entry.get("published") is not None:
                published.append(
                    (
                        str(entry.get("host_ip") or ""),
                        int(entry["published"]),
                        int(entry["target"]),
                        str(entry.get("protocol") or "tcp"),
                    )
                )
            continue
        text, _, protocol = str(entry).partition("/")
        parts = text.rsplit(":", 2)
        if len(parts) == 1:  # container port only: a random host port
            continue
        host_ip = parts[0] if len(parts) == 3 else ""
        published.append((host_ip, int(parts[-2]), int(parts[-1]), protocol or "tcp"))
    return published


@dataclass(frozen=True, slots=True)
class Gateway:
    service: str  # the compose service running `meshgate run`
    bootstrap: Path  # the host file mounted as its config
    document: Mapping[str, Any]


def _gateway(name: str) -> Gateway:
    """The gateway service ``name`` runs (``meshgate run -c PATH``), with its bootstrap read from the host."""
    command = _command(name)
    assert command[:2] == ["meshgate", "run"], f"{name}: expected `meshgate run -c FILE`, got {command}"
    config = _flag(command, "-c", "--config")
    assert config, f"{name}: `meshgate run` without -c"
    host = _resolve(name, config)
    assert host is not None, f"{name}: its config {config} is not bind-mounted from the host"
    assert host.is_file(), f"{name}: its config {config} is mounted from {host}, which does not exist"
    document = yaml.safe_load(host.read_text(encoding="utf-8"))
    assert isinstance(document, Mapping), f"{name}: {host} is not a mapping"
    return Gateway(name, host, document)


def _gateway_services() -> list[str]:
    return [name for name in _services() if _command(name)[:2] == ["meshgate", "run"]]


def _listening(name: str) -> set[int]:
    """The ports service ``name`` answers on, as far as the files here say: its own command line (--listen,
    --addr), its PORT variable, its image's defaults, and the gateways sharing its network namespace."""
    service = _service(name)
    command = _command(name)
    ports: set[int] = set()
    for flag in ("--listen", "--addr"):
        value = _flag(command, flag)
        if value:
            ports.add(_port_of(value))
    if "PORT" in _environment(name):
        ports.add(int(_environment(name)["PORT"]))
    if service.get("image"):
        ports |= IMAGE_PORTS.get(_image_repo(str(service["image"]))[0], frozenset())
    for other in _gateway_services():
        if other == name or _netns_owner(other) == name:
            document = _gateway(other).document
            ports |= {_port_of(str(document[key])) for key in ("listen", "admin") if key in document}
    return ports


def _strings(node: object) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _yaml_file(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------- the file


def test_compose_file_parses() -> None:
    document = _compose()
    # The compose spec dropped `version:`; compose v2 warns that it is obsolete.
    assert "version" not in document, "top-level `version:` is obsolete in the compose spec: remove it"
    for name, service in _services().items():
        assert isinstance(service, Mapping), f"{name}: expected a mapping"
        assert service.get("image") or service.get("build"), f"{name}: neither image nor build"


def _compose_cli() -> list[str] | None:
    """A compose implementation that parses without an engine (`config` talks to no daemon), or None."""
    for candidate in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(candidate[0]) is None:
            continue
        try:
            done = subprocess.run([*candidate, "version"], capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return candidate
    return None


def test_docker_compose_accepts_the_file() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    done = subprocess.run(
        [*cli, "-f", str(COMPOSE_FILE), "--profile", "traffic", "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{' '.join(cli)} config refuses {COMPOSE_FILE.name}:\n{done.stderr}{done.stdout}"


def test_the_topology_services_are_defined() -> None:
    services = _services()
    problems = [f"{name}: missing (a service of the demo topology)" for name in PUBLISHED if name not in services]
    problems += [f"{name}: not in the topology table of this test" for name in services if name not in PUBLISHED]
    for name, profile in PROFILES.items():
        if name in services and profile not in (services[name].get("profiles") or []):
            problems.append(f"{name}: expected `profiles: [{profile}]` (started only with --profile {profile})")
    problems += [
        f"{name}: under profiles {service['profiles']}, the demo topology starts it by default"
        for name, service in services.items()
        if service.get("profiles") and name not in PROFILES
    ]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------- files


def test_bind_mounts_exist_and_are_read_only() -> None:
    problems: list[str] = []
    declared = set((_compose().get("volumes") or {}).keys())
    for name in _services():
        mounts = _mounts(name)
        for mount in mounts:
            if mount.source is None:
                if mount.volume is not None and mount.volume not in declared:
                    problems.append(f"{name}: volume {mount.volume!r} is not declared under top-level `volumes`")
                continue
            if not mount.source.exists():
                problems.append(f"{name}: mounts {_rel(mount.source)} at {mount.target}, which does not exist")
            if not mount.read_only:
                problems.append(f"{name}: {mount.spec} is writable: nothing in the stack should write the checkout")
            # Docker creates a missing mount point; inside a read-only bind mount that mkdir fails at start
            # ("read-only file system", docker/for-linux#128), so the point must exist on the host already.
            for outer in mounts:
                inner, holder = PurePosixPath(mount.target), PurePosixPath(outer.target)
                if outer.source is None or not outer.read_only or holder not in inner.parents:
                    continue
                point = outer.source.joinpath(*inner.relative_to(holder).parts)
                if not point.exists():
                    problems.append(
                        f"{name}: {mount.target} is mounted inside the read-only mount of {_rel(outer.source)}, "
                        f"which has no {_rel(point)} to mount on"
                    )
    assert not problems, "\n".join(problems)


def _build(name: str) -> tuple[Path, Path] | None:
    """(context, Dockerfile) of a service that is built; None for one that only pulls an image."""
    build = _service(name).get("build")
    if build is None:
        return None
    context_text, dockerfile = (build, "Dockerfile") if isinstance(build, str) else (build["context"], None)
    context = (COMPOSE_DIR / context_text).resolve()
    return context, context / (dockerfile or build.get("dockerfile", "Dockerfile"))


def _dockerfile(name: str) -> Path | None:
    build = _build(name)
    return build[1] if build else None


def test_build_contexts_and_dockerfiles_exist() -> None:
    problems: list[str] = []
    for name in _services():
        build = _build(name)
        if build is None:
            continue
        context, dockerfile = build
        if not context.is_dir():
            problems.append(f"{name}: build context {_rel(context)} does not exist")
        elif not dockerfile.is_file():
            problems.append(f"{name}: no Dockerfile {_rel(dockerfile)}")
    assert not problems, "\n".join(problems)


def _base_images(dockerfile: Path) -> Iterator[str]:
    """The FROM images of a Dockerfile (ARG defaults substituted; earlier stages and scratch left out)."""
    args: dict[str, str] = {}
    stages: set[str] = {"scratch"}
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].upper() == "ARG" and len(words) > 1 and "=" in words[1]:
            key, _, value = words[1].partition("=")
            args.setdefault(key, value.strip("\"'"))
        elif words[0].upper() == "FROM":
            rest = [word for word in words[1:] if not word.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), rest[0])
            if len(rest) >= 3 and rest[1].upper() == "AS":
                stages.add(rest[2])
            if image not in stages:
                yield image


def test_every_image_is_pinned_to_an_exact_version() -> None:
    problems: list[str] = []
    for name, service in _services().items():
        dockerfile = _dockerfile(name)
        if dockerfile is None:
            images = [str(service.get("image") or "")]
            where = "image"
        elif dockerfile.is_file():
            images = list(_base_images(dockerfile))
            where = f"FROM in {_rel(dockerfile)}"
        else:
            continue  # reported by test_build_contexts_and_dockerfiles_exist
        for image in images:
            _, tag = _image_repo(image)
            if tag is None or tag == "latest" or not EXACT_TAG.fullmatch(tag):
                problems.append(f"{name}: {where} {image!r} is not pinned to an exact version tag (like 1.2.3)")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------- network


@pytest.mark.parametrize(("sidecar", "app"), SIDECARS.items())
def test_a_sidecar_shares_its_apps_network_namespace(sidecar: str, app: str) -> None:
    assert _netns_owner(sidecar) == app, f'{sidecar}: expected network_mode: "service:{app}"'
    listen = _gateway(sidecar).document.get("listen")
    assert listen, f"{sidecar}: its bootstrap has no listen address"
    published = {container for _, _, container, _ in _published(app)}
    assert _port_of(str(listen)) in published, (
        f"{app}: does not publish {_port_of(str(listen))}, the listener of {sidecar} in its network namespace"
    )


def test_network_mode_names_a_service_and_the_joiner_publishes_nothing() -> None:
    problems: list[str] = []
    for name, service in _services().items():
        owner = _netns_owner(name)
        if owner is None:
            continue
        if owner not in _services():
            problems.append(f"{name}: network_mode names {owner!r}, which is not a service")
        # A container in another's network namespace has no ports or networks of its own (compose refuses them).
        problems += [
            f"{name}: `{key}` with network_mode: service:{owner}"
            for key in ("ports", "networks", "expose")
            if service.get(key)
        ]
        if owner in _services() and _netns_owner(owner) is not None:
            problems.append(f"{name}: {owner} itself joins another namespace; join the owner directly")
    gateways_in_netns = {name for name in _gateway_services() if _netns_owner(name)}
    problems += [
        f"{name}: a gateway sidecar missing from SIDECARS in this test"
        for name in gateways_in_netns
        if name not in SIDECARS
    ]
    assert not problems, "\n".join(problems)


def test_published_ports_are_the_user_facing_ones_and_do_not_clash() -> None:
    problems: list[str] = []
    taken: dict[tuple[str, int, str], str] = {}
    for name in _services():
        ports = _published(name)
        for host_ip, host_port, _, protocol in ports:
            if host_ip != "127.0.0.1":
                # The IdP mints any token and the tokens are public demo values: nothing for the network to reach.
                problems.append(f"{name}: publishes {host_port} on {host_ip or 'every address'}, not 127.0.0.1")
            key = (host_ip, host_port, protocol)
            # An empty host ip is every address: it clashes with any ip on the same port.
            clashes = [
                other
                for (ip, port, proto), other in taken.items()
                if port == host_port and proto == protocol and (ip == host_ip or "" in (ip, host_ip))
            ]
            problems += [
                f"{name}: host port {host_port}/{protocol} is already published by {other}" for other in clashes
            ]
            taken[key] = name
        required, optional = PUBLISHED.get(name, (frozenset(), frozenset()))
        host_ports = {host_port for _, host_port, _, _ in ports}
        if missing := required - host_ports:
            problems.append(f"{name}: does not publish {sorted(missing)} (user-facing in the demo topology)")
        if extra := host_ports - required - optional:
            problems.append(f"{name}: publishes {sorted(extra)}; only user-facing ports go to the host")
    assert not problems, "\n".join(problems)


def test_depends_on_names_services_and_waits_only_for_health_that_exists() -> None:
    problems: list[str] = []
    services = _services()
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        entries = {dep: {"condition": "service_started"} for dep in depends} if isinstance(depends, list) else depends
        for dep, options in entries.items():
            condition = (options or {}).get("condition", "service_started")
            if dep not in services:
                problems.append(f"{name}: depends on {dep!r}, which is not a service")
                continue
            if condition not in CONDITIONS:
                problems.append(f"{name}: depends on {dep} with unknown condition {condition!r}")
            if condition == "service_healthy" and not _has_healthcheck(dep):
                problems.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
            if services[dep].get("profiles") and not service.get("profiles"):
                problems.append(
                    f"{name}: depends on {dep}, which only starts under profiles {services[dep]['profiles']}"
                )
    assert not problems, "\n".join(problems)


def test_addresses_in_the_mounted_configs_point_at_services_that_listen_there() -> None:
    """Every host:port in a bootstrap, a seeded service config, the OPA config and the Grafana data sources names a
    compose service (reachable by that name) and a port that service listens on."""
    sources: list[tuple[str, Any]] = [
        (_rel(_gateway(name).bootstrap), _gateway(name).document) for name in _gateway_services()
    ]
    seed = _seed_dir()
    if seed is not None and (seed / "services").is_dir():
        sources += [(_rel(path), _yaml_file(path)) for path in sorted((seed / "services").glob("*.yaml"))]
    sources.append((_rel(_opa_config_file()), _yaml_file(_opa_config_file())))
    grafana = _grafana_provisioning()
    if grafana is not None:
        sources += [(_rel(path), _yaml_file(path)) for path in sorted((grafana / "datasources").glob("*.yaml"))]
    services = _services()
    problems: list[str] = []
    for where, document in sources:
        for text in _strings(document):
            match = ADDRESS.fullmatch(text.strip())
            if match is None or match["host"] in LOCAL_HOSTS:
                continue
            host, port = match["host"], int(match["port"])
            if host not in services:
                problems.append(f"{where}: {text} names {host!r}, which is not a compose service")
            elif owner := _netns_owner(host):
                problems.append(f"{where}: {text}: {host} has no address of its own (it shares {owner}'s); use {owner}")
            elif port not in _listening(host):
                problems.append(f"{where}: {text}: {host} listens on {sorted(_listening(host))}, not {port}")
            elif _environment(host).get("BIND") in LOOPBACK and _environment(host).get("PORT") == str(port):
                problems.append(f"{where}: {text}: {host} binds {port} on loopback only (BIND), unreachable from here")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------- gateways


@pytest.mark.parametrize("sidecar", SIDECARS)
def test_the_mounted_bootstrap_passes_meshgate_check(sidecar: str, tmp_path: Path) -> None:
    """`meshgate check` as the container would run it. The bootstrap names container paths (token_file is
    /etc/meshgate/tokens/<svc>.token), which do not exist here: a copy with every path the service mounts pointed at
    its host file is checked instead. A container path nothing mounts stays as it is, and fails the check."""
    gateway = _gateway(sidecar)

    def to_host(node: object) -> object:
        if isinstance(node, Mapping):
            return {key: to_host(value) for key, value in node.items()}
        if isinstance(node, list):
            return [to_host(value) for value in node]
        if isinstance(node, str) and node.startswith("/"):
            host = _resolve(sidecar, node)
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
    assert done.returncode == 0, f"{sidecar}: meshgate check refuses {_rel(gateway.bootstrap)}:\n{done.stderr}"


def _config_service_tokens() -> TokenSet:
    tokens = _flag(_command("configservice"), "--tokens")
    assert tokens, "configservice: no --tokens (the demo tokens must be the fixed ones the sidecars and OPA hold)"
    host = _host_file("configservice", tokens, "--tokens")
    try:
        return load_tokens(host)
    except ConfigError as error:
        pytest.fail(f"configservice: {_rel(host)} is not a valid tokens file:\n{error}")


def _token_in(name: str, container_path: str) -> tuple[str, str]:
    host = _resolve(name, container_path)
    assert host is not None, f"{name}: token file {container_path} is not mounted"
    assert host.is_file(), f"{name}: token file {container_path} is mounted from {_rel(host)}, which does not exist"
    return host.read_text(encoding="utf-8").strip(), _rel(host)


def test_the_mounted_tokens_are_known_to_the_config_service_with_the_right_role() -> None:
    tokens = {token.secret: token for token in _config_service_tokens().tokens}
    problems: list[str] = []
    for name in _gateway_services():
        gateway = _gateway(name)
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
    command = _command("prometheus")
    config = _flag(command, "--config.file")
    assert config, "prometheus: no --config.file"
    host = _host_file("prometheus", config, "--config.file")
    assert "--enable-feature=exemplar-storage" in command, "prometheus: exemplar storage off: no trace links"
    targets: dict[str, dict[str, str]] = {}
    for job in _yaml_file(host).get("scrape_configs") or []:
        for static in job.get("static_configs") or []:
            for target in static.get("targets") or []:
                targets[str(target)] = {"job": str(job.get("job_name")), **(static.get("labels") or {})}
    expected: dict[str, str] = {}
    for name in _gateway_services():
        document = _gateway(name).document
        reach = _netns_owner(name) or name
        expected[f"{reach}:{_port_of(str(document['admin']))}"] = str(document["service"])
    listen = _flag(_command("configservice"), "--listen") or "127.0.0.1:7000"
    expected[f"configservice:{_port_of(listen)}"] = "configservice"
    problems: list[str] = []
    for target, service in expected.items():
        if target not in targets:
            problems.append(f"prometheus: {_rel(host)} does not scrape {target} ({service})")
        elif targets[target].get("service") != service:
            problems.append(
                f"prometheus: target {target} has label service={targets[target].get('service')!r}, "
                f"the dashboards expect {service!r}"
            )
    for target in targets:
        if ADDRESS.fullmatch(target) and target not in expected:
            host_name, port = target.rsplit(":", 1)
            if host_name not in _services() or int(port) not in _listening(host_name):
                problems.append(f"prometheus: target {target} is not an admin or metrics port in the topology")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------- OPA


def _opa_config_file() -> Path:
    config = _flag(_command("opa"), "--config-file", "-c")
    assert config, "opa: no --config-file"
    return _host_file("opa", config, "--config-file")


def _opa_config() -> Mapping[str, Any]:
    document = _yaml_file(_opa_config_file())
    assert isinstance(document, Mapping), f"opa: {_rel(_opa_config_file())} is not a mapping"
    return document


def _opa_bundle() -> Mapping[str, Any]:
    bundle = (_opa_config().get("bundles") or {}).get("authz")
    assert isinstance(bundle, Mapping), f"opa: {_rel(_opa_config_file())} has no bundles.authz"
    return bundle


def test_opa_pulls_the_authz_bundle_from_the_config_service() -> None:
    bundle = _opa_bundle()
    service = (_opa_config().get("services") or {}).get(bundle.get("service"))
    assert isinstance(service, Mapping), f"opa: bundles.authz.service {bundle.get('service')!r} is not in services"
    url = f"{str(service['url']).rstrip('/')}/{str(bundle.get('resource', '')).lstrip('/')}"
    listen = _flag(_command("configservice"), "--listen") or "127.0.0.1:7000"
    expected = f"http://configservice:{_port_of(listen)}/v1/bundles/authz"
    assert url == expected, f"opa: bundle authz is fetched from {url}; the config service serves it at {expected}"
    depends = _service("opa").get("depends_on") or {}
    assert "configservice" in depends, "opa: does not wait for the config service it pulls from"


def test_every_gateway_that_asks_opa_waits_for_it() -> None:
    problems: list[str] = []
    seed = _seed_dir()
    configs = {path.stem: _yaml_file(path) for path in sorted((seed / "services").glob("*.yaml"))} if seed else {}
    for name in _gateway_services():
        service = str(_gateway(name).document.get("service"))
        authz = (configs.get(service) or {}).get("authz") or {}
        if authz.get("engine") != "opa":
            continue
        depends = _service(name).get("depends_on") or {}
        condition = (depends.get("opa") or {}).get("condition") if isinstance(depends, Mapping) else None
        if condition != "service_healthy":
            problems.append(f"{name}: {service} asks OPA (authz.engine opa) but does not wait for opa to be healthy")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------- seed


def _seed_dir() -> Path | None:
    """The host directory whose layout --seed expects: compose/seed (services/, bundles/<name>/)."""
    return COMPOSE_DIR / "seed" if (COMPOSE_DIR / "seed").is_dir() else None


def test_the_config_service_sees_the_whole_seed_and_the_shipped_policy_as_bundle_authz() -> None:
    seed = _flag(_command("configservice"), "--seed")
    assert seed, "configservice: no --seed"
    host_seed = _seed_dir()
    assert host_seed is not None, "compose/seed does not exist"
    expected = {f"{seed}/services": host_seed / "services", f"{seed}/bundles/authz": ROOT / "policy" / "rego"}
    bundles = host_seed / "bundles"
    if bundles.is_dir():  # a bundle is a directory or NAME.tar.gz; --seed skips hidden names
        expected |= {
            f"{seed}/bundles/{path.name}": path for path in sorted(bundles.iterdir()) if not path.name.startswith(".")
        }
    problems = [
        f"configservice: {container} should be {_rel(host)}, is "
        f"{_rel(resolved) if (resolved := _resolve('configservice', container)) else 'not mounted'}"
        for container, host in expected.items()
        if _resolve("configservice", container) != host.resolve()
    ]
    if (bundles / "authz").exists() or (bundles / "authz.tar.gz").exists():
        problems.append("compose/seed/bundles/authz: the bundle authz is the shipped policy/rego; rename this one")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------- grafana


def _grafana_provisioning() -> Path | None:
    container = _environment("grafana").get("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning")
    return _resolve("grafana", container)


def test_grafana_provisioning_is_mounted_where_grafana_and_the_providers_look() -> None:
    provisioning = _grafana_provisioning()
    assert provisioning is not None, "grafana: nothing from the host is mounted at its provisioning path"
    assert provisioning.is_dir(), f"grafana: its provisioning is mounted from {_rel(provisioning)}, not a directory"
    problems: list[str] = []
    providers_files = sorted((provisioning / "dashboards").glob("*.yaml"))
    if not providers_files:
        problems.append(f"grafana: no dashboard providers in {_rel(provisioning / 'dashboards')}")
    for path in providers_files:
        for provider in _yaml_file(path).get("providers") or []:
            folder = str((provider.get("options") or {}).get("path") or "")
            host = _resolve("grafana", folder) if folder else None
            if host is None:
                problems.append(f"grafana: {_rel(path)} reads dashboards from {folder!r}, where nothing is mounted")
            elif not any(host.glob("*.json")):
                problems.append(f"grafana: {_rel(path)} reads {folder}, mounted from {_rel(host)}: no *.json there")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------- the image


def test_every_meshgate_process_runs_the_meshgate_image() -> None:
    problems: list[str] = []
    for name, service in _services().items():
        command = _command(name)
        module = command[2] if command[:2] == ["python", "-m"] and len(command) > 2 else ""
        if command[:1] != ["meshgate"] and module != "gateway" and not module.startswith("gateway."):
            continue
        if _dockerfile(name) != (COMPOSE_DIR / "Dockerfile").resolve():
            problems.append(f"{name}: runs meshgate but is not built from compose/Dockerfile")
        if service.get("image") != _service("configservice").get("image"):
            problems.append(f"{name}: image {service.get('image')!r}, not the configservice's meshgate image")
    assert not problems, "\n".join(problems)


def _copy_sources(dockerfile: Path) -> list[str]:
    sources: list[str] = []
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(word.startswith("--from") for word in words):
            sources += [word for word in words[1:-1] if not word.startswith("--")]
    return sources


def test_the_meshgate_dockerfile_copies_what_the_build_needs_and_dockerignore_lets_it_in() -> None:
    import tomllib

    dockerfile = COMPOSE_DIR / "Dockerfile"
    sources = [source.rstrip("/") for source in _copy_sources(dockerfile)]
    problems = [
        f"compose/Dockerfile: COPY {source}: no such file in the repository"
        for source in sources
        if not (ROOT / source).exists()
    ]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    needed = {"pyproject.toml", str(project["project"].get("readme", "README.md"))}
    needed |= {pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    problems += [
        f"compose/Dockerfile: does not COPY {path} (needed to build the wheel)"
        for path in sorted(needed)
        if path not in sources
    ]
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    if patterns[:1] != ["*"]:
        problems.append(".dockerignore: expected an allowlist (first pattern `*`, then `!path` per COPY source)")
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    problems += [
        f".dockerignore: COPY {source} is not let in (add !{source})" for source in sources if source not in allowed
    ]
    problems += [
        f".dockerignore: lets {path} into the build context"
        for path in ("tests", ".git", "bench", "bench/out", "meshgate-demo")
        if path in allowed
    ]
    assert not problems, "\n".join(problems)
