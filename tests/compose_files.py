"""Reading compose/docker-compose.yml and the host files behind its mounts, for the static compose tests.

``tests/integration/test_compose_file.py`` checks the compose file itself and ``test_compose_configs.py`` what the
files it mounts say; both read through here, without Docker and without a network. A container path is resolved to
the host file through the service's mounts, so no path or port is copied into the tests. A helper that finds the
file or the service missing fails the calling test with an ``AssertionError`` naming the service and the problem.

The tables below are what the demo topology fixes (which services exist, which ports are published, which sidecar
sits in which app's network namespace): a new service in the compose file needs its lines here too.
"""

from __future__ import annotations

import functools
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

__all__ = [
    "COMPOSE_DIR",
    "COMPOSE_FILE",
    "IMAGE_PORTS",
    "PROFILES",
    "PUBLISHED",
    "ROOT",
    "SIDECARS",
    "Gateway",
    "Mount",
    "build",
    "command",
    "compose",
    "dockerfile",
    "environment",
    "flag",
    "gateway",
    "gateway_services",
    "grafana_provisioning",
    "host_file",
    "image_repo",
    "listening",
    "mounts",
    "netns_owner",
    "opa_config_file",
    "port_of",
    "rel",
    "resolve",
    "seed_dir",
    "service",
    "services",
    "strings",
    "yaml_file",
]

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"

# ---------------------------------------------------------------------------------------------------- the topology

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

# ---------------------------------------------------------------------------------------------------- the compose file


@functools.cache
def compose() -> Mapping[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, Mapping), f"{COMPOSE_FILE}: expected a mapping at the top level"
    return document


def services() -> Mapping[str, Mapping[str, Any]]:
    found = compose().get("services")
    assert isinstance(found, Mapping), f"{COMPOSE_FILE}: no services mapping"
    assert found, f"{COMPOSE_FILE}: no services"
    return found


def service(name: str) -> Mapping[str, Any]:
    found = services()
    assert name in found, f"{name}: not defined in {COMPOSE_FILE.name}"
    return found[name]


def command(name: str) -> list[str]:
    value = service(name).get("command") or []
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]


def flag(words: list[str], *flags: str) -> str | None:
    """The value of the first of ``flags`` in ``words`` (``--flag value`` or ``--flag=value``)."""
    for index, part in enumerate(words):
        for name in flags:
            if part == name and index + 1 < len(words):
                return words[index + 1]
            if part.startswith(name + "="):
                return part.split("=", 1)[1]
    return None


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def environment(name: str) -> dict[str, str]:
    value = service(name).get("environment") or {}
    if isinstance(value, Mapping):
        return {str(key): str(item) for key, item in value.items()}
    return dict(str(entry).partition("=")[::2] for entry in value)


def netns_owner(name: str) -> str | None:
    mode = str(service(name).get("network_mode") or "")
    return mode.removeprefix("service:") if mode.startswith("service:") else None


def image_repo(image: str) -> tuple[str, str | None]:
    """``repo[:tag][@digest]`` -> (repo, tag); a registry's ``host:port/`` is part of the repo."""
    image = image.split("@", 1)[0]
    slash = image.rfind("/")
    if ":" in image[slash + 1 :]:
        repo, _, tag = image.rpartition(":")
        return repo, tag
    return image, None


def build(name: str) -> tuple[Path, Path] | None:
    """(context, Dockerfile) of a service that is built; None for one that only pulls an image."""
    value = service(name).get("build")
    if value is None:
        return None
    context_text, file = (value, "Dockerfile") if isinstance(value, str) else (value["context"], None)
    context = (COMPOSE_DIR / context_text).resolve()
    return context, context / (file or value.get("dockerfile", "Dockerfile"))


def dockerfile(name: str) -> Path | None:
    found = build(name)
    return found[1] if found else None


# ---------------------------------------------------------------------------------------------------- mounts


@dataclass(frozen=True, slots=True)
class Mount:
    target: str  # the container path
    source: Path | None  # the host path of a bind mount; None for a volume
    volume: str | None  # the named volume's name; None for a bind mount or an anonymous volume
    read_only: bool
    spec: str  # as written, for messages


def mounts(name: str) -> list[Mount]:
    found: list[Mount] = []
    for entry in service(name).get("volumes") or []:
        if isinstance(entry, str):
            parts = entry.split(":")
            if len(parts) == 1:  # a lone container path: an anonymous volume
                found.append(Mount(parts[0], None, None, False, entry))
                continue
            source, target = parts[0], parts[1]
            read_only = len(parts) > 2 and "ro" in parts[2].split(",")
        else:
            source, target = str(entry.get("source") or ""), str(entry["target"])
            read_only = bool(entry.get("read_only"))
        is_bind = source.startswith((".", "/", "~"))
        host = (COMPOSE_DIR / Path(source).expanduser()).resolve() if is_bind else None
        volume = source if source and not is_bind else None
        found.append(Mount(target.rstrip("/") or "/", host, volume, read_only, str(entry)))
    return found


def resolve(name: str, container_path: str) -> Path | None:
    """The host path behind ``container_path`` in service ``name``: through the innermost mount that holds it;
    None when no bind mount does (the image's own file system, or a volume)."""
    path = PurePosixPath(container_path)
    holders = [m for m in mounts(name) if path == PurePosixPath(m.target) or PurePosixPath(m.target) in path.parents]
    if not holders:
        return None
    innermost = max(holders, key=lambda m: len(PurePosixPath(m.target).parts))
    if innermost.source is None:
        return None
    return innermost.source.joinpath(*path.relative_to(innermost.target).parts)


def host_file(name: str, container_path: str, what: str) -> Path:
    """The host file mounted at ``container_path`` (``what`` names it in messages)."""
    host = resolve(name, container_path)
    assert host is not None, f"{name}: {what} {container_path} is not mounted from the host"
    assert host.is_file(), f"{name}: {what} {container_path} is mounted from {rel(host)}, which does not exist"
    return host


# ---------------------------------------------------------------------------------------------------- gateways


@dataclass(frozen=True, slots=True)
class Gateway:
    service: str  # the compose service running `meshgate run`
    bootstrap: Path  # the host file mounted as its config
    document: Mapping[str, Any]


def gateway(name: str) -> Gateway:
    """The gateway service ``name`` runs (``meshgate run -c PATH``), with its bootstrap read from the host."""
    words = command(name)
    assert words[:2] == ["meshgate", "run"], f"{name}: expected `meshgate run -c FILE`, got {words}"
    config = flag(words, "-c", "--config")
    assert config, f"{name}: `meshgate run` without -c"
    host = resolve(name, config)
    assert host is not None, f"{name}: its config {config} is not bind-mounted from the host"
    assert host.is_file(), f"{name}: its config {config} is mounted from {host}, which does not exist"
    document = yaml.safe_load(host.read_text(encoding="utf-8"))
    assert isinstance(document, Mapping), f"{name}: {host} is not a mapping"
    return Gateway(name, host, document)


def gateway_services() -> list[str]:
    return [name for name in services() if command(name)[:2] == ["meshgate", "run"]]


def listening(name: str) -> set[int]:
    """The ports service ``name`` answers on, as far as the files here say: its own command line (--listen,
    --addr), its PORT variable, its image's defaults, and the gateways sharing its network namespace."""
    words = command(name)
    ports: set[int] = set()
    for name_of_flag in ("--listen", "--addr"):
        value = flag(words, name_of_flag)
        if value:
            ports.add(port_of(value))
    if "PORT" in environment(name):
        ports.add(int(environment(name)["PORT"]))
    image = service(name).get("image")
    if image:
        ports |= IMAGE_PORTS.get(image_repo(str(image))[0], frozenset())
    for other in gateway_services():
        if other == name or netns_owner(other) == name:
            document = gateway(other).document
            ports |= {port_of(str(document[key])) for key in ("listen", "admin") if key in document}
    return ports


# ---------------------------------------------------------------------------------------------------- mounted files


def seed_dir() -> Path | None:
    """The host directory whose layout --seed expects: compose/seed (services/, bundles/<name>/)."""
    return COMPOSE_DIR / "seed" if (COMPOSE_DIR / "seed").is_dir() else None


def opa_config_file() -> Path:
    config = flag(command("opa"), "--config-file", "-c")
    assert config, "opa: no --config-file"
    return host_file("opa", config, "--config-file")


def grafana_provisioning() -> Path | None:
    container = environment("grafana").get("GF_PATHS_PROVISIONING", "/etc/grafana/provisioning")
    return resolve("grafana", container)


def strings(node: object) -> Iterator[str]:
    """Every string anywhere in a parsed YAML document."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def yaml_file(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))
