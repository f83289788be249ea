"""compose/docker-compose.yml itself is what compose needs: checked without Docker, without a network.

What `docker compose up` would only tell at run time, minutes in: a service the demo topology needs that is missing,
a mounted file that is not there, a writable or nested mount that fails, a build context or Dockerfile that does
not exist, an image tag that moves, a sidecar whose listener nobody publishes, a port published twice or beyond
loopback, a ``service_healthy`` wait on a service without a healthcheck, a meshgate process on another image, a
Dockerfile ``COPY`` that ``.dockerignore`` leaves out.

The compose file is read through ``tests/compose_files.py``, which also holds the demo topology's tables (which
services exist, which ports are published, which sidecar sits in which app's network namespace). What the mounted
files say (bootstraps, tokens, Prometheus, OPA, Grafana, seed) is checked in ``test_compose_configs.py``. Each
failure names the service and the problem.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath

import pytest

from tests import compose_files as cf

# An exact release: 1.2.3, v3.7.3, 7.4.6-alpine, 3.11.13-slim-bookworm; never latest, never 1 or 1.2.
EXACT_TAG = re.compile(r"v?\d+\.\d+\.\d+(?:[.-][A-Za-z0-9._-]+)?")
CONDITIONS = frozenset({"service_started", "service_healthy", "service_completed_successfully"})


def _has_healthcheck(name: str) -> bool:
    check = cf.service(name).get("healthcheck")
    if not isinstance(check, Mapping) or check.get("disable"):
        return False
    test = check.get("test")
    return bool(test) and test != ["NONE"]


def _published(name: str) -> list[tuple[str, int, int, str]]:
    """(host ip, host port, container port, protocol) for every published port of ``name``."""
    published: list[tuple[str, int, int, str]] = []
    for entry in cf.service(name).get("ports") or []:
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


# ---------------------------------------------------------------------------------------------------- the file


def test_compose_file_parses() -> None:
    document = cf.compose()
    # The compose spec dropped `version:`; compose v2 warns that it is obsolete.
    assert "version" not in document, "top-level `version:` is obsolete in the compose spec: remove it"
    for name, service in cf.services().items():
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
        [*cli, "-f", str(cf.COMPOSE_FILE), "--profile", "traffic", "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{' '.join(cli)} config refuses {cf.COMPOSE_FILE.name}:\n{done.stderr}{done.stdout}"


def test_the_topology_services_are_defined() -> None:
    services = cf.services()
    problems = [f"{name}: missing (a service of the demo topology)" for name in cf.PUBLISHED if name not in services]
    problems += [
        f"{name}: not in the topology table (PUBLISHED in tests/compose_files.py)"
        for name in services
        if name not in cf.PUBLISHED
    ]
    for name, profile in cf.PROFILES.items():
        if name in services and profile not in (services[name].get("profiles") or []):
            problems.append(f"{name}: expected `profiles: [{profile}]` (started only with --profile {profile})")
    problems += [
        f"{name}: under profiles {service['profiles']}, the demo topology starts it by default"
        for name, service in services.items()
        if service.get("profiles") and name not in cf.PROFILES
    ]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------- files


def test_bind_mounts_exist_and_are_read_only() -> None:
    problems: list[str] = []
    declared = set((cf.compose().get("volumes") or {}).keys())
    for name in cf.services():
        mounts = cf.mounts(name)
        for mount in mounts:
            if mount.source is None:
                if mount.volume is not None and mount.volume not in declared:
                    problems.append(f"{name}: volume {mount.volume!r} is not declared under top-level `volumes`")
                continue
            if not mount.source.exists():
                problems.append(f"{name}: mounts {cf.rel(mount.source)} at {mount.target}, which does not exist")
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
                        f"{name}: {mount.target} is mounted inside the read-only mount of {cf.rel(outer.source)}, "
                        f"which has no {cf.rel(point)} to mount on"
                    )
    assert not problems, "\n".join(problems)


def test_build_contexts_and_dockerfiles_exist() -> None:
    problems: list[str] = []
    for name in cf.services():
        build = cf.build(name)
        if build is None:
            continue
        context, dockerfile = build
        if not context.is_dir():
            problems.append(f"{name}: build context {cf.rel(context)} does not exist")
        elif not dockerfile.is_file():
            problems.append(f"{name}: no Dockerfile {cf.rel(dockerfile)}")
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
    for name, service in cf.services().items():
        dockerfile = cf.dockerfile(name)
        if dockerfile is None:
            images = [str(service.get("image") or "")]
            where = "image"
        elif dockerfile.is_file():
            images = list(_base_images(dockerfile))
            where = f"FROM in {cf.rel(dockerfile)}"
        else:
            continue  # reported by test_build_contexts_and_dockerfiles_exist
        for image in images:
            _, tag = cf.image_repo(image)
            if tag is None or tag == "latest" or not EXACT_TAG.fullmatch(tag):
                problems.append(f"{name}: {where} {image!r} is not pinned to an exact version tag (like 1.2.3)")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------- network


@pytest.mark.parametrize(("sidecar", "app"), cf.SIDECARS.items())
def test_a_sidecar_shares_its_apps_network_namespace(sidecar: str, app: str) -> None:
    assert cf.netns_owner(sidecar) == app, f'{sidecar}: expected network_mode: "service:{app}"'
    listen = cf.gateway(sidecar).document.get("listen")
    assert listen, f"{sidecar}: its bootstrap has no listen address"
    published = {container for _, _, container, _ in _published(app)}
    assert cf.port_of(str(listen)) in published, (
        f"{app}: does not publish {cf.port_of(str(listen))}, the listener of {sidecar} in its network namespace"
    )


def test_network_mode_names_a_service_and_the_joiner_publishes_nothing() -> None:
    problems: list[str] = []
    for name, service in cf.services().items():
        owner = cf.netns_owner(name)
        if owner is None:
            continue
        if owner not in cf.services():
            problems.append(f"{name}: network_mode names {owner!r}, which is not a service")
        # A container in another's network namespace has no ports or networks of its own (compose refuses them).
        problems += [
            f"{name}: `{key}` with network_mode: service:{owner}"
            for key in ("ports", "networks", "expose")
            if service.get(key)
        ]
        if owner in cf.services() and cf.netns_owner(owner) is not None:
            problems.append(f"{name}: {owner} itself joins another namespace; join the owner directly")
    gateways_in_netns = {name for name in cf.gateway_services() if cf.netns_owner(name)}
    problems += [
        f"{name}: a gateway sidecar missing from SIDECARS in tests/compose_files.py"
        for name in gateways_in_netns
        if name not in cf.SIDECARS
    ]
    assert not problems, "\n".join(problems)


def test_published_ports_are_the_user_facing_ones_and_do_not_clash() -> None:
    problems: list[str] = []
    taken: dict[tuple[str, int, str], str] = {}
    for name in cf.services():
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
        required, optional = cf.PUBLISHED.get(name, (frozenset(), frozenset()))
        host_ports = {host_port for _, host_port, _, _ in ports}
        if missing := required - host_ports:
            problems.append(f"{name}: does not publish {sorted(missing)} (user-facing in the demo topology)")
        if extra := host_ports - required - optional:
            problems.append(f"{name}: publishes {sorted(extra)}; only user-facing ports go to the host")
    assert not problems, "\n".join(problems)


def test_depends_on_names_services_and_waits_only_for_health_that_exists() -> None:
    problems: list[str] = []
    services = cf.services()
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


# ---------------------------------------------------------------------------------------------------- the image


def test_every_meshgate_process_runs_the_meshgate_image() -> None:
    problems: list[str] = []
    for name, service in cf.services().items():
        command = cf.command(name)
        module = command[2] if command[:2] == ["python", "-m"] and len(command) > 2 else ""
        if command[:1] != ["meshgate"] and module != "gateway" and not module.startswith("gateway."):
            continue
        if cf.dockerfile(name) != (cf.COMPOSE_DIR / "Dockerfile").resolve():
            problems.append(f"{name}: runs meshgate but is not built from compose/Dockerfile")
        if service.get("image") != cf.service("configservice").get("image"):
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

    dockerfile = cf.COMPOSE_DIR / "Dockerfile"
    sources = [source.rstrip("/") for source in _copy_sources(dockerfile)]
    problems = [
        f"compose/Dockerfile: COPY {source}: no such file in the repository"
        for source in sources
        if not (cf.ROOT / source).exists()
    ]
    project = tomllib.loads((cf.ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    needed = {"pyproject.toml", str(project["project"].get("readme", "README.md"))}
    needed |= {pattern.rstrip("*") for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    problems += [
        f"compose/Dockerfile: does not COPY {path} (needed to build the wheel)"
        for path in sorted(needed)
        if path not in sources
    ]
    patterns = [
        line.strip()
        for line in (cf.ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
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
