"""``meshgate demo``: the compose topology as local processes, with embedded defaults and no Docker.

Writes its working files under ``--data`` (tokens made fresh for this directory, the seed and bootstrap files from
``compose/`` localized by ``topology.py``, logs), starts every process in dependency order and waits for each to
answer, shows a real allowed and a real denied request, prints what to try, and stops everything on Ctrl-C or
SIGTERM. Prometheus, Redis and the local trace store are started when they can be (Prometheus and Redis are Debian
packages); the rest is this repository.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.config.document import load_text
from gateway.configservice.seed import CONFIG_SUFFIXES
from gateway.demo.topology import (
    COMPOSE,
    GATEWAYS,
    OPA_BUNDLE,
    OPTIONAL_PORTS,
    PORTS,
    ROOT,
    Process,
    localize,
    localize_service,
)

__all__ = ["DemoError", "DemoOptions", "admin_token", "run_demo"]

PYTHON = sys.executable
IDP = "http://127.0.0.1:7777"
CONFIG_SERVICE = "http://127.0.0.1:7000"
ALICE_ROLES = "orders.read,orders.write,payments.read,payments.charge"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# The optional parts' ports, from the one table of them (topology.OPTIONAL_PORTS).
OTLP, TRACES, PROMETHEUS, REDIS = (
    OPTIONAL_PORTS[name] for name in ("trace store (OTLP)", "trace store (query)", "Prometheus", "Redis")
)
# Every URL the demo itself opens is on 127.0.0.1: never through a proxy from the environment.
_URLS = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True, slots=True)
class DemoOptions:
    data: Path
    traffic: bool = False
    prometheus: bool = True
    scrape_interval: str | None = None  # overrides compose's 5s (the dashboard test scrapes every second)


class DemoError(Exception):
    """The demo cannot start; the message says why and what to do."""


def run_demo(options: DemoOptions) -> int:
    processes: list[tuple[Process, subprocess.Popen[bytes]]] = []

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM, or the terminal closing (SIGHUP), stops the demo exactly like Ctrl-C

    # Installed before anything starts, so a signal at any point still reaches the cleanup below.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    try:
        plan = _prepare(options)
        logs = options.data / "logs"
        for step in plan:
            process = _start(step, logs)
            processes.append((step, process))
            if step.ready_url is not None and not _wait_ready(step.ready_url, process, 30.0):
                if not step.optional:
                    raise DemoError(f"{step.name} did not start; see {logs / (step.name + '.log')}")
                print(f"meshgate demo: {step.name} did not start, going on without it; see its log", flush=True)
                _stop(process)
                processes.pop()
        print(_banner(options, [step.name for step, _ in processes]), flush=True)
        while all(p.poll() is None for _, p in processes):
            time.sleep(0.5)
        gone = [step.name for step, p in processes if p.poll() is not None]
        print(f"meshgate demo: {', '.join(gone)} exited; see {logs}; stopping", file=sys.stderr, flush=True)
        return 1
    except DemoError as error:
        print(f"meshgate demo: {error}", file=sys.stderr, flush=True)
        return 1
    except OSError as error:  # the data directory cannot be written, a program cannot be started
        where = f"{error.filename}: " if error.filename else ""
        print(f"meshgate demo: {where}{error.strerror or error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave processes on the demo's fixed ports.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        # In reverse start order, each stopped before the next is asked: traffic stops before the sidecars drain,
        # the sidecars flush their last spans while the trace store still runs.
        for _, process in reversed(processes):
            _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _prepare(options: DemoOptions) -> list[Process]:
    """Check the ports, write the working files, and return the processes to start, in order."""
    if not (COMPOSE / "docker-compose.yml").is_file():
        raise DemoError(f"{COMPOSE}: not found; the demo runs compose/ from a meshgate source checkout")
    busy = [f"{what} 127.0.0.1:{port}" for what, port in PORTS.items() if _in_use(port)]
    if busy:
        raise DemoError("ports in use: " + ", ".join(busy) + " (stop what holds them, or the previous demo)")
    data = options.data.resolve()
    for sub in ("logs", "tokens", "gateways", "seed/services", "seed/bundles"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    tokens = _tokens(data)
    _write_seed(data)
    for service in GATEWAYS:
        bootstrap = localize(_yaml(COMPOSE / "gateways" / f"{service}.yaml"))
        bootstrap["config_service"]["token_file"] = str(data / "tokens" / f"{service}.token")
        bootstrap["config_service"]["cache_dir"] = str(data / "cache")  # the gateway adds its service's directory
        (data / "gateways" / f"{service}.json").write_text(json.dumps(bootstrap, indent=2))

    skipped = [f"{what} 127.0.0.1:{port}" for what, port in OPTIONAL_PORTS.items() if _in_use(port)]
    if skipped:
        # Not started by the demo; whatever listens there is what the stack will talk to (a Redis there gets the
        # shared rate-limit keys).
        print("meshgate demo: ports in use, not started by the demo: " + ", ".join(skipped), flush=True)
    plan: list[Process] = []
    if not any(_in_use(port) for port in (OTLP, TRACES)):
        argv = [PYTHON, "-m", "gateway.demo.traces", "--otlp", f"127.0.0.1:{OTLP}", "--query", f"127.0.0.1:{TRACES}"]
        plan.append(Process("traces", argv, f"http://127.0.0.1:{TRACES}/api/services", optional=True))
    redis = shutil.which("redis-server")
    if redis is not None and not _in_use(REDIS):
        argv = [redis, "--port", str(REDIS), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        plan.append(Process("redis", argv, None))
    plan.append(Process("idp", [PYTHON, "-m", "gateway.demo.idp", "--listen", "127.0.0.1:7777"], f"{IDP}/"))
    configservice = [PYTHON, "-m", "gateway", "configservice", "--data", str(data / "configservice")]
    configservice += ["--tokens", str(tokens), "--seed", str(data / "seed"), "--listen", "127.0.0.1:7000"]
    plan.append(Process("configservice", configservice, f"{CONFIG_SERVICE}/healthz"))
    apps = COMPOSE / "services"
    plan.append(Process("orders", [PYTHON, str(apps / "orders" / "app.py")], "http://127.0.0.1:9001/healthz"))
    plan.append(Process("payments", [PYTHON, str(apps / "payments" / "app.py")], "http://127.0.0.1:9002/healthz"))
    plan.append(
        Process(
            "payments-b",
            [PYTHON, str(apps / "payments" / "app.py")],
            "http://127.0.0.1:9003/healthz",
            {"PORT": "9003", "INSTANCE": "payments-b", "FAIL_RATIO": "0.3"},
        )
    )
    for service, (_, admin) in GATEWAYS.items():
        argv = [PYTHON, "-m", "gateway", "run", "-c", str(data / "gateways" / f"{service}.json")]
        plan.append(Process(f"{service}-sidecar", argv, f"http://127.0.0.1:{admin}/readyz"))
    prometheus = shutil.which("prometheus")
    if options.prometheus and prometheus is not None and not _in_use(PROMETHEUS):
        plan.append(_prometheus(prometheus, data, options.scrape_interval))
    if options.traffic:
        plan.append(Process("traffic", [PYTHON, "-m", "gateway.demo.traffic"], None))
    return plan


def _tokens(data: Path) -> Path:
    """``data/tokens.yaml``: compose's token names and roles with fresh secrets (made once per data directory), and
    one token file per gateway."""
    path = data / "tokens.yaml"
    if not path.exists():
        names = _yaml(COMPOSE / "tokens.yaml")["tokens"]
        tokens = [{**entry, "token": secrets.token_urlsafe(24)} for entry in names]
        _write_secret(path, yaml.safe_dump({"tokens": tokens}, sort_keys=False))
    for entry in _yaml(path)["tokens"]:
        if entry.get("role") == "gateway" and entry.get("service"):
            _write_secret(data / "tokens" / f"{entry['service']}.token", entry["token"] + "\n")
    return path


def _write_secret(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only, from the first byte (not chmod after the fact)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # an existing file keeps its old mode through O_CREAT
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(text)


def admin_token(data: Path) -> str:
    """The admin token of the demo in ``data`` (for pushes to its config service)."""
    return str(next(entry["token"] for entry in _yaml(data / "tokens.yaml")["tokens"] if entry.get("role") == "admin"))


def _write_seed(data: Path) -> None:
    """``data/seed``: compose/seed with its configs localized, and the shipped policy where compose mounts it."""
    seed = data / "seed"
    for source in sorted((COMPOSE / "seed" / "services").iterdir()):
        if source.suffix in CONFIG_SUFFIXES:  # any other file is the config service's to refuse, as in compose
            local = localize_service(_yaml(source))
            (seed / "services" / f"{source.stem}.json").write_text(json.dumps(local, indent=2))
    bundles = [(ROOT / "policy" / "rego", OPA_BUNDLE), *((p, p.name) for p in (COMPOSE / "seed" / "bundles").iterdir())]
    for source, name in sorted(bundles):
        if source.is_dir():
            shutil.copytree(source, seed / "bundles" / name, dirs_exist_ok=True)
        else:
            shutil.copy(source, seed / "bundles" / name)


def _prometheus(binary: str, data: Path, interval: str | None) -> Process:
    config = localize(_yaml(COMPOSE / "prometheus" / "prometheus.yml"))
    if interval is not None:
        config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = interval
    directory = data / "prometheus"
    directory.mkdir(exist_ok=True)
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [
        binary,
        f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{PROMETHEUS}",
        "--enable-feature=exemplar-storage",
    ]
    return Process("prometheus", argv, f"http://127.0.0.1:{PROMETHEUS}/-/ready", optional=True)


def _start(process: Process, logs: Path) -> subprocess.Popen[bytes]:
    with (logs / f"{process.name}.log").open("ab") as log:
        return subprocess.Popen(
            process.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            # Everything here talks to 127.0.0.1: a user's proxy settings must not send it elsewhere.
            env={**os.environ, "PYTHONUNBUFFERED": "1", "no_proxy": "127.0.0.1,localhost", **process.env},
            # Its own session: Ctrl-C goes to the demo alone, which stops the others in order. The parent-death
            # signal covers the demo itself being killed (kill -9): no process is left holding a fixed port.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the demo process dies (Linux ``PR_SET_PDEATHSIG``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _banner(options: DemoOptions, started: list[str]) -> str:
    data = options.data.resolve()
    lines = [
        "meshgate demo is up",
        "",
        "  orders sidecar     http://127.0.0.1:8081   admin http://127.0.0.1:9911/metrics",
        "  payments sidecar   http://127.0.0.1:8082   admin http://127.0.0.1:9912/status/upstreams",
        "                     (payments-b, one of its two instances, fails 30% of its answers)",
        f"  config service     {CONFIG_SERVICE}   admin token: {data / 'tokens.yaml'}",
        f"  demo IdP           {IDP}   mints a token for any user and roles (demo only)",
    ]
    if "traces" in started:
        lines.append(f"  traces             http://127.0.0.1:{TRACES}  Jaeger's query API, a local stand-in")
    if "prometheus" in started:
        prometheus = f"http://127.0.0.1:{PROMETHEUS}"
        lines.append(f"  Prometheus         {prometheus}   dashboards' queries: grafana/dashboards/*.json")
    lines += [f"  logs (JSON lines)  {data / 'logs'}", ""]
    lines += _try_lines("traces" in started)
    lines += ["", *_example(data / "logs", "traces" in started), ""]
    if "traffic" in started:
        lines.append("Traffic is flowing (allowed, denied, rate-limited, retried): see logs/traffic.log.")
    lines.append("Ctrl-C stops everything.")
    return "\n".join(lines)


def _try_lines(traces: bool) -> list[str]:
    lines = [
        "Try:",
        f"  TOKEN=$(curl -s '{IDP}/token?sub=alice&roles={ALICE_ROLES}')",
        '  curl -i -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8081/orders/1    # allowed: see x-decision-id',
        f"  BOB=$(curl -s '{IDP}/token?sub=bob')",
        '  curl -s -H "Authorization: Bearer $BOB" http://127.0.0.1:8081/orders       # 403: decision_id and reason',
        "  curl -i http://127.0.0.1:8081/orders                                         # 401: no token",
    ]
    if traces:
        lines += [
            f"  curl -s http://127.0.0.1:{TRACES}/api/traces/TRACE_ID        # a trace, by the trace_id of a reply",
            f"  curl -s -G http://127.0.0.1:{TRACES}/api/traces --data-urlencode service=orders \\",
            '       --data-urlencode \'tags={"meshgate.authz.decision_id":"DECISION_ID"}\'   # by decision id',
        ]
    return lines


def _example(logs: Path, traces: bool) -> list[str]:
    """One real denial, made now, so the reader sees its decision id, reason and trace id without typing."""
    try:
        with _URLS.open(f"{IDP}/token?sub=bob", timeout=5) as response:
            token = response.read().decode().strip()
        request = urllib.request.Request("http://127.0.0.1:8081/orders", headers={"Authorization": f"Bearer {token}"})
        _URLS.open(request, timeout=5).close()
        return ["(bob's request was allowed: has the policy changed?)"]
    except urllib.error.HTTPError as error:
        with error:
            status, raw = error.code, error.read()
    except OSError as error:
        return [f"(the example request failed: {error})"]
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return [f"(bob was refused with HTTP {status}, but not with the gateway's JSON reply)"]
    trace = body.get("trace_id")
    lines = [
        f"Just now, bob was denied: HTTP {status} decision_id={body.get('decision_id')}",
        f"  reason: {body.get('message')}",
        f"  log:    grep {body.get('decision_id')} {logs / 'orders-sidecar.log'}   (access and decision log lines)",
    ]
    if traces:
        lines.insert(2, f"  trace:  http://127.0.0.1:{TRACES}/api/traces/{trace}")
    return lines


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with _URLS.open(url, timeout=1) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


def _in_use(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no conflict
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _yaml(path: Path) -> Any:
    # The gateway's own reader: plain YAML 1.1 would read a retry policy's `on:` key as the boolean true.
    return load_text(path.read_text(encoding="utf-8"))
