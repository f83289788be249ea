"""The cost of TLS and mesh mTLS in meshgate against plain HTTP, in one run on 127.0.0.1.

Run from the repository root::

    python bench/tls.py [--rounds 3] [--duration 6] [--connections 50] [--hs-duration 5] [--hs-threads 8]

Three experiments, each a set of variants measured ``--rounds`` times, interleaved (the order within an experiment
reversed every other round), so that every TLS variant has a plain-HTTP partner measured right next to it; ratios
are **paired** (variant ÷ its plain partner of the same round, median over rounds).

1. **Keep-alive** (``ka-plain`` / ``ka-tls``): wrk (``-t1 -c50``, HTTP/1.1 keep-alive) -> one meshgate -> upstream
   nginx. ``ka-tls`` is the same config plus a listener ``tls`` section (EC P-256 server certificate for 127.0.0.1
   from a CA made for the run); wrk speaks HTTPS to it. Gateway CPU per request, req/s, p99.
2. **Mesh pair** (``pair-plain`` / ``pair-mtls``): wrk (plain) -> gateway ``orders`` -> gateway ``payments`` ->
   upstream nginx. ``pair-mtls``: both gateways bootstrap from a real ``meshgate configservice`` (the mesh CA) with
   gateway tokens bound to their service; ``payments`` serves ``mesh: {mtls: strict}``, ``orders`` (listener
   ``mtls: disabled``, so wrk can speak plain HTTP to it) calls it through a cluster with ``mesh_identity:
   spiffe://meshgate.local/service/payments``. ``pair-plain``: the same routes and clusters in plain file configs,
   no mesh. CPU per request of each gateway; the orders -> payments connections are watched in ``/proc/net/tcp``
   every 0.1 s (distinct client ports seen = connections opened = TLS handshakes in the mesh variant), and the
   upstream nginx's ``stub_status`` counts payments' new connections to it.
3. **Fresh connections** (``hs-plain`` / ``hs-tls`` / ``hs-mtls``): ``bench/conn_client.py`` (threads, on the load
   core) opens a new connection for every request (``Connection: close``; full handshakes, no session reuse) to the
   ``ka-plain`` gateway, the ``ka-tls`` gateway, and the strict ``payments`` mesh listener (client certificate
   issued by the config service to a token bound to service ``loadgen``). Gateway CPU per connection.

Pinning as ``bench/run.py``: gateways on core 0 (both gateways of the pair share it), wrk / the client, the upstream
nginx (one worker), the config service and this harness on core 1. CPU from ``/proc/<pid>/stat`` (utime+stime of the
process tree). "other load": busy core-seconds during a run not used by any process of this run (the harness and
its children included); a run above 0.15 cores is measured again (``--retries``) and the quieter kept.

Both mesh gateways take their routes and clusters from the config service (pushed with the admin token before they
start; ``orders``' push carries the ``mesh_identity`` cluster), as well as their certificates and the CA bundle.

Raw results: ``<out>/results.json``, tables: ``<out>/summary.md`` (``--out``, default ``bench/out/tls``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import resource
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import run as harness

REPO = harness.REPO
PROXY_CORE, LOAD_CORE, CLK_TCK = harness.PROXY_CORE, harness.LOAD_CORE, harness.CLK_TCK
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"
TOKENS = {  # gateway tokens bound to a service: the service a mesh certificate is issued for
    "orders": "bench-orders-token-0123456789abcdef",
    "payments": "bench-payments-token-0123456789abcdef",
    "loadgen": "bench-loadgen-token-0123456789abcdef",
}
PAYMENTS_ID = "spiffe://meshgate.local/service/payments"
EXPERIMENTS: dict[str, tuple[str, ...]] = {
    "keep-alive": ("ka-plain", "ka-tls"),
    "mesh pair": ("pair-plain", "pair-mtls"),
    "fresh connections": ("hs-plain", "hs-tls", "hs-mtls"),
}
BASELINE = {"keep-alive": "ka-plain", "mesh pair": "pair-plain", "fresh connections": "hs-plain"}


# --------------------------------------------------------------------------------------------------------------
# certificates


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and an EC P-256 server certificate for 127.0.0.1 / localhost signed by it: (ca.pem, server.pem, .key)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshgate bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-gateway")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem_key(key))
    paths[2].chmod(0o600)
    return paths


def _call(
    url: str, token: str, *, method: str = "GET", body: bytes | None = None, ctype: str = ""
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if ctype:
        request.add_header("Content-Type", ctype)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def issue_client_cert(cs_url: str, token: str, directory: Path) -> tuple[Path, Path, Path, str]:
    """A mesh certificate from the config service (CSR, ``POST /v1/certificates``): (cert, key, CA bundle, id)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loadgen")]))
        .sign(key, hashes.SHA256())
    )
    status, body = _call(
        f"{cs_url}/v1/certificates",
        token,
        method="POST",
        body=csr.public_bytes(serialization.Encoding.PEM),
        ctype="application/x-pem-file",
    )
    if status != 201:
        raise harness.BenchError(f"POST /v1/certificates answered {status}: {body[:300]!r}")
    answer = json.loads(body)
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "loadgen.pem", directory / "loadgen.key", directory / "mesh-ca.pem"
    paths[0].write_text(answer["certificate"])
    paths[1].write_bytes(_pem_key(key))
    paths[1].chmod(0o600)
    paths[2].write_text(answer["ca"])
    return (*paths, answer["identity"])


# --------------------------------------------------------------------------------------------------------------
# processes


@dataclass
class Gw:
    name: str
    item: harness.Managed
    listen: int
    admin: int


@dataclass
class Env:
    args: argparse.Namespace
    procs: harness.Processes
    workdir: Path
    started: list[harness.Managed] = field(default_factory=list)  # every long-running process of the run
    up_port: int = 0
    gws: dict[str, Gw] = field(default_factory=dict)
    cs_url: str = ""
    tls_ca: Path | None = None
    mesh: tuple[Path, Path, Path, str] | None = None  # loadgen cert, key, mesh CA bundle, identity


def start_gateway(env: Env, name: str, config: dict[str, Any]) -> Gw:
    listen, admin = harness.free_port(), harness.free_port()
    config = {
        "service": config.pop("service"),
        "listen": f"127.0.0.1:{listen}",
        "admin": f"127.0.0.1:{admin}",
        **config,
    }
    config.setdefault("telemetry", {"logs": {"level": "info", "access_log": False}})
    directory = env.workdir / name
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = ["taskset", "-c", str(PROXY_CORE), sys.executable, "-m", "gateway", "run", "-c", str(path)]
    penv = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    item = env.procs.start(name, argv, log=directory / "gateway.log", cwd=REPO, env=penv)
    env.started.append(item)
    harness.wait_ready(f"http://127.0.0.1:{admin}/readyz", item, timeout=60)
    gw = Gw(name, item, listen, admin)
    env.gws[name] = gw
    return gw


def _routes(cluster: str) -> list[dict[str, Any]]:
    return [{"name": "all", "match": {"path_prefix": "/"}, "cluster": cluster}]


def _cluster(name: str, port: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": name, "endpoints": [f"127.0.0.1:{port}"], **extra}]


def start_config_service(env: Env) -> None:
    data = env.workdir / "cs-data"
    tokens = env.workdir / "cs-tokens.yaml"
    entries = [{"name": "ops", "token": ADMIN_TOKEN, "role": "admin"}]
    entries += [{"name": f"{s}-gw", "token": t, "role": "gateway", "service": s} for s, t in TOKENS.items()]
    tokens.write_text(yaml.safe_dump({"tokens": entries}))
    port = harness.free_port()
    argv = ["taskset", "-c", str(LOAD_CORE), sys.executable, "-m", "gateway", "configservice", "--data", str(data)]
    argv += ["--listen", f"127.0.0.1:{port}", "--tokens", str(tokens)]
    item = env.procs.start("configservice", argv, log=env.workdir / "configservice.log", cwd=REPO)
    env.started.append(item)
    env.cs_url = f"http://127.0.0.1:{port}"
    harness.wait_ready(f"{env.cs_url}/healthz", item, timeout=30)


def _mesh_bootstrap(env: Env, service: str, mtls: str) -> dict[str, Any]:
    directory = env.workdir / f"{service}-mtls"
    directory.mkdir(parents=True, exist_ok=True)
    token_file = directory / "gateway.token"
    token_file.write_text(TOKENS[service])
    token_file.chmod(0o600)
    return {
        "service": service,
        "config_service": {"url": env.cs_url, "token_file": str(token_file), "cache_dir": str(directory / "cache")},
        "mesh": {"mtls": mtls},
    }


def push(env: Env, service: str, pushed: dict[str, Any]) -> None:
    """``PUT /v1/services/<service>/config`` with the admin token (the service validates it as a gateway would)."""
    url = f"{env.cs_url}/v1/services/{service}/config"
    status, body = _call(url, ADMIN_TOKEN, method="PUT", body=json.dumps(pushed).encode(), ctype="application/json")
    if status not in (200, 201):
        raise harness.BenchError(f"push of {service}'s config answered {status}: {body[:300]!r}")


def start_all(env: Env) -> None:
    """The upstream nginx, the config service and the six gateways (all stay up for the whole run)."""
    env.up_port = harness.free_port()
    nginx = harness.start_nginx(
        env.procs, "upstream", env.workdir, harness.upstream_block(env.up_port), LOAD_CORE, env.up_port
    )
    env.started.append(nginx)
    ca, cert, key = make_server_cert(env.workdir / "certs")
    env.tls_ca = ca
    start_gateway(
        env,
        "ka-plain",
        {"service": "bench", "routes": _routes("upstream"), "clusters": _cluster("upstream", env.up_port)},
    )
    start_gateway(
        env,
        "ka-tls",
        {
            "service": "bench",
            "routes": _routes("upstream"),
            "clusters": _cluster("upstream", env.up_port),
            "tls": {"cert_file": str(cert), "key_file": str(key)},
        },
    )
    pay = start_gateway(
        env,
        "payments-plain",
        {"service": "payments", "routes": _routes("app"), "clusters": _cluster("app", env.up_port)},
    )
    start_gateway(
        env,
        "orders-plain",
        {"service": "orders", "routes": _routes("payments"), "clusters": _cluster("payments", pay.listen)},
    )
    start_config_service(env)
    pushed = {"routes": _routes("app"), "clusters": _cluster("app", env.up_port)}
    push(env, "payments", pushed)
    pay = start_gateway(env, "payments-mtls", {**_mesh_bootstrap(env, "payments", "strict"), **pushed})
    pushed = {"routes": _routes("payments"), "clusters": _cluster("payments", pay.listen, mesh_identity=PAYMENTS_ID)}
    push(env, "orders", pushed)
    start_gateway(env, "orders-mtls", {**_mesh_bootstrap(env, "orders", "disabled"), **pushed})
    env.mesh = issue_client_cert(env.cs_url, TOKENS["loadgen"], env.workdir / "certs")


# --------------------------------------------------------------------------------------------------------------
# sanity


def _get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def _refused(url: str, context: ssl.SSLContext | None = None) -> str:
    try:
        status, _ = _get(url, context)
    except (OSError, ssl.SSLError) as error:
        return f"{type(error).__name__}"
    raise harness.BenchError(f"{url} answered {status} where it must refuse the connection")


def sanity(env: Env) -> dict[str, Any]:
    """Every path answers 200 with the upstream's body, and the TLS listeners refuse what they must."""
    assert env.tls_ca is not None
    assert env.mesh is not None
    body = harness.BODY.encode()
    out: dict[str, Any] = {}
    tls_ctx = ssl.create_default_context(cafile=str(env.tls_ca))
    mesh_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    mesh_ctx.check_hostname = False
    mesh_ctx.load_verify_locations(str(env.mesh[2]))
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(str(env.mesh[2]))
    mesh_ctx.load_cert_chain(str(env.mesh[0]), str(env.mesh[1]))
    checks: list[tuple[str, str, ssl.SSLContext | None]] = [
        ("ka-plain", f"http://127.0.0.1:{env.gws['ka-plain'].listen}/", None),
        ("ka-tls", f"https://127.0.0.1:{env.gws['ka-tls'].listen}/", tls_ctx),
        ("pair-plain", f"http://127.0.0.1:{env.gws['orders-plain'].listen}/", None),
        ("pair-mtls", f"http://127.0.0.1:{env.gws['orders-mtls'].listen}/", None),
        (
            "payments-mtls with a mesh client certificate",
            f"https://127.0.0.1:{env.gws['payments-mtls'].listen}/",
            mesh_ctx,
        ),
    ]
    for name, url, context in checks:
        status, got = _get(url, context)
        if status != 200 or got != body:
            raise harness.BenchError(f"sanity {name}: {url} answered {status} {got[:200]!r}")
        out[name] = status
    pay = env.gws["payments-mtls"].listen
    out["payments-mtls plain HTTP"] = _refused(f"http://127.0.0.1:{pay}/")
    out["payments-mtls TLS without a client certificate"] = _refused(f"https://127.0.0.1:{pay}/", anonymous)
    out["ka-tls plain HTTP"] = _refused(f"http://127.0.0.1:{env.gws['ka-tls'].listen}/")
    out["loadgen identity"] = env.mesh[3]
    for name in ("orders-mtls", "payments-mtls"):  # serving the version pushed to the config service
        status, got = _get(f"http://127.0.0.1:{env.gws[name].admin}/readyz")
        out[f"{name} /readyz"] = got.decode(errors="replace")[:200]
        if status != 200 or b"config_service" not in got:
            raise harness.BenchError(f"{name} /readyz: {status} {got[:200]!r}")
    return out


# --------------------------------------------------------------------------------------------------------------
# measurement


def _ticks_all(env: Env) -> dict[int, tuple[int, int]]:
    ticks: dict[int, tuple[int, int]] = {}
    for item in env.started:
        ticks.update(harness.cpu_ticks(item.pid))
    return ticks


def _self_cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class ConnWatcher:
    """Client ports of ESTABLISHED connections to ``port`` on 127.0.0.1, from /proc/net/tcp every ``interval`` s.

    Distinct client ports seen = connections opened (each one a TLS handshake on a mesh listener). Each new port is
    stamped with the time it was first seen after the start, so a pool refilled at the start of a run (wrk's abrupt
    stop at the end of the previous run drops the requests in flight, and their upstream connections with them) is
    told apart from connections opened in the steady state. A connection that opens and closes between two samples
    would be missed: the gateway's own counts are not available (meshgate has no connection metrics).
    """

    STEADY_AFTER_S = 1.0

    def __init__(self, port: int, interval: float = 0.1) -> None:
        self.port, self.interval = port, interval
        self.first_seen: dict[int, float] = {}
        self.first: set[int] = set()
        self.last: set[int] = set()
        self.samples = 0
        self.max_open = 0
        self._t0 = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def snapshot(self) -> set[int]:
        ports: set[int] = set()
        with open("/proc/net/tcp") as fh:
            next(fh)
            for line in fh:
                parts = line.split()
                local, remote, state = parts[1], parts[2], parts[3]
                if state == "01" and int(remote.rsplit(":", 1)[1], 16) == self.port:
                    ports.add(int(local.rsplit(":", 1)[1], 16))
        return ports

    def _take(self) -> None:
        ports = self.snapshot()
        now = time.monotonic() - self._t0
        if not self.samples:
            self.first = ports
        for port in ports - self.first_seen.keys():
            self.first_seen[port] = now
        self.last = ports
        self.samples += 1
        self.max_open = max(self.max_open, len(ports))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def __enter__(self) -> ConnWatcher:
        self._t0 = time.monotonic()
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def summary(self) -> dict[str, int]:
        opened = [t for port, t in self.first_seen.items() if port not in self.first]
        return {
            "open_at_start": len(self.first),
            "open_at_end": len(self.last),
            "max_open": self.max_open,
            "distinct_seen": len(self.first_seen),
            "opened_during_run": len(opened),
            "opened_first_second": sum(1 for t in opened if t <= self.STEADY_AFTER_S),
            "opened_after_first_second": sum(1 for t in opened if t > self.STEADY_AFTER_S),
            "samples": self.samples,
        }


def run_client(argv: Sequence[str], timeout: float) -> tuple[dict[str, Any], float]:
    """Run ``bench/conn_client.py`` pinned to LOAD_CORE; its JSON answer and its own CPU seconds (rusage)."""
    out_path = Path(argv[-1])
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            ["taskset", "-c", str(LOAD_CORE), *argv[:-1]],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    try:
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                raise harness.BenchError("conn_client did not finish in time")
            time.sleep(0.05)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    text = out_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise harness.BenchError(f"conn_client exited {proc.returncode}: {text[-2000:]}")
    return json.loads(text.strip().splitlines()[-1]), rusage.ru_utime + rusage.ru_stime


@dataclass
class Load:
    """How one variant is loaded and what is accounted."""

    variant: str
    gateways: tuple[str, ...]  # whose CPU is reported (first: the one the load enters)
    url: str = ""  # wrk target (keep-alive experiments)
    client: list[str] = field(default_factory=list)  # conn_client.py arguments (fresh-connection experiment)
    watch_port: int | None = None  # count connections to this port (orders -> payments)


def loads(env: Env) -> dict[str, Load]:
    assert env.tls_ca is not None
    assert env.mesh is not None
    g = env.gws
    client = [sys.executable, str(REPO / "bench" / "conn_client.py"), "--threads", str(env.args.hs_threads)]
    cert, key, mesh_ca, _ = env.mesh
    return {
        "ka-plain": Load("ka-plain", ("ka-plain",), url=f"http://127.0.0.1:{g['ka-plain'].listen}/"),
        "ka-tls": Load("ka-tls", ("ka-tls",), url=f"https://127.0.0.1:{g['ka-tls'].listen}/"),
        "pair-plain": Load(
            "pair-plain",
            ("orders-plain", "payments-plain"),
            url=f"http://127.0.0.1:{g['orders-plain'].listen}/",
            watch_port=g["payments-plain"].listen,
        ),
        "pair-mtls": Load(
            "pair-mtls",
            ("orders-mtls", "payments-mtls"),
            url=f"http://127.0.0.1:{g['orders-mtls'].listen}/",
            watch_port=g["payments-mtls"].listen,
        ),
        "hs-plain": Load("hs-plain", ("ka-plain",), client=[*client, "--port", str(g["ka-plain"].listen)]),
        "hs-tls": Load(
            "hs-tls", ("ka-tls",), client=[*client, "--port", str(g["ka-tls"].listen), "--ca", str(env.tls_ca)]
        ),
        "hs-mtls": Load(
            "hs-mtls",
            ("payments-mtls",),
            client=[
                *client,
                "--port",
                str(g["payments-mtls"].listen),
                "--ca",
                str(mesh_ca),
                "--cert",
                str(cert),
                "--key",
                str(key),
                "--no-check-hostname",
            ],
        ),
    }


def measure_once(env: Env, load: Load, rnd: int) -> dict[str, Any]:
    args = env.args
    pids = {name: env.gws[name].item.pid for name in load.gateways}
    accepts0, requests0 = harness.upstream_counters(env.up_port)
    g0 = {name: harness.cpu_ticks(pid) for name, pid in pids.items()}
    up0 = harness.cpu_ticks(env.started[0].pid)  # the upstream nginx
    all0, self0 = _ticks_all(env), _self_cpu()
    c0 = harness.core_times()
    t0 = time.monotonic()
    watcher = ConnWatcher(load.watch_port) if load.watch_port else None
    extra: dict[str, Any] = {}
    if load.client:
        duration = args.hs_duration
        out_file = env.workdir / f"client-{load.variant}.json"
        argv = [*load.client, "--duration", str(duration), str(out_file)]
        answer, load_cpu = run_client(argv, duration + 60)
        count, seconds = answer["connections"], answer["seconds"]
        rate, latency = answer["rate"], answer["latency_ms"]
        errors = sum(answer["errors"].values())
        extra = {"client_errors": answer["errors"], "tls": answer["tls"]}
    else:
        if watcher:
            watcher.__enter__()
        try:
            wrk = harness.run_wrk(load.url, args.duration, args.connections, env.workdir)
        finally:
            if watcher:
                watcher.__exit__()
        count, seconds, rate, latency = wrk.requests, wrk.seconds, wrk.rps, wrk.latency_ms
        errors, load_cpu = wrk.errors, wrk.wrk_cpu_s
        extra = {"socket_errors": wrk.socket_errors, "non_2xx_3xx": wrk.non_2xx_3xx}
    wall = time.monotonic() - t0
    c1 = harness.core_times()
    all1, self1 = _ticks_all(env), _self_cpu()
    up1 = harness.cpu_ticks(env.started[0].pid)
    g1 = {name: harness.cpu_ticks(pid) for name, pid in pids.items()}
    accepts1, requests1 = harness.upstream_counters(env.up_port)
    busy_s = sum(b1 - c0[core][0] for core, (b1, _) in c1.items()) / CLK_TCK
    ours = sum(harness.cpu_delta_s(all0, all1)) + (self1 - self0)
    result: dict[str, Any] = {
        "variant": load.variant,
        "round": rnd,
        "count": count,  # requests (wrk) or connections (conn_client), each one request
        "seconds": seconds,
        "rate": rate,
        "latency_ms": latency,
        "errors": errors,
        "load_us_per": round(load_cpu * 1e6 / count, 2) if count else None,
        "upstream_us_per": round(sum(harness.cpu_delta_s(up0, up1)) * 1e6 / count, 2) if count else None,
        "upstream_new_connections": accepts1 - accepts0 - 1,  # minus the second stub_status reading
        "upstream_requests": requests1 - requests0 - 1,
        "core_busy": harness.core_busy(c0, c1),
        "other_load_cores": round((busy_s - ours) / wall, 2) if wall > 0 else None,
        "gateways": {},
        **extra,
    }
    for name in load.gateways:
        user, system = harness.cpu_delta_s(g0[name], g1[name])
        result["gateways"][name] = {
            "us_per": round((user + system) * 1e6 / count, 2) if count else None,
            "user_us_per": round(user * 1e6 / count, 2) if count else None,
            "sys_us_per": round(system * 1e6 / count, 2) if count else None,
            "util": round((user + system) / wall, 3) if wall else None,
        }
    result["us_per_total"] = round(sum(v["us_per"] for v in result["gateways"].values()), 2) if count else None
    if watcher:
        result["connections_to_payments"] = watcher.summary()
    return result


def measure(env: Env, load: Load, rnd: int) -> dict[str, Any]:
    """Warm-up, then measured runs (again while other load spoiled one; the quietest kept)."""
    args = env.args
    print(f"== {load.variant} (round {rnd}) ...", flush=True)
    if load.client:
        warm = env.workdir / f"client-{load.variant}-warmup.json"
        run_client([*load.client, "--duration", "1", str(warm)], 60)
    else:
        harness.run_wrk(load.url, args.warmup, args.connections, env.workdir)
    best: dict[str, Any] | None = None
    for attempt in range(1, args.retries + 2):
        waited = harness.wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
        result = measure_once(env, load, rnd)
        result["attempt"], result["quiet_wait_s"] = attempt, waited
        if best is None or (result["other_load_cores"] or 0) < (best["other_load_cores"] or 0):
            best = result
        print(
            f"   {result['rate']:,.0f}/s p99 {result['latency_ms'].get('p99')} ms, "
            f"gateway µs/{'conn' if load.client else 'req'} "
            + ", ".join(f"{n} {v['us_per']}" for n, v in result["gateways"].items())
            + f", other load {result['other_load_cores']}, errors {result['errors']}"
            + (
                f", conns to payments {result['connections_to_payments']}"
                if "connections_to_payments" in result
                else ""
            ),
            flush=True,
        )
        if (result["other_load_cores"] or 0) <= harness.NOISY_CORES:
            break
    assert best is not None
    return best


# --------------------------------------------------------------------------------------------------------------
# report

_med = harness._median
_fmt = harness._fmt


def paired(
    results: list[dict[str, Any]], variant: str, base: str, key: Callable[[dict[str, Any]], float | None]
) -> dict[str, Any]:
    """Per round ``key(variant) / key(base)`` and ``key(variant) - key(base)``; medians over rounds."""
    by_round = {(r["variant"], r["round"]): r for r in results}
    rounds = sorted({r["round"] for r in results if r["variant"] == variant})
    ratios, deltas = [], []
    for rnd in rounds:
        a, b = by_round.get((variant, rnd)), by_round.get((base, rnd))
        va, vb = (key(a) if a else None), (key(b) if b else None)
        if va is not None and vb:
            ratios.append(va / vb)
            deltas.append(va - vb)
    return {
        "ratio": round(_med(ratios), 3) if ratios else None,
        "delta": round(_med(deltas), 2) if deltas else None,
        "ratios": [round(x, 3) for x in ratios],
        "deltas": [round(x, 1) for x in deltas],
    }


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for experiment, variants in EXPERIMENTS.items():
        base = BASELINE[experiment]
        for variant in variants:
            runs = [r for r in results if r["variant"] == variant]
            if not runs:
                continue
            names = list(runs[0]["gateways"])
            row: dict[str, Any] = {
                "experiment": experiment,
                "rounds": len(runs),
                "rate": _med([r["rate"] for r in runs]),
                "p50": _med([r["latency_ms"].get("p50") for r in runs]),
                "p99": _med([r["latency_ms"].get("p99") for r in runs]),
                "us_per_total": _med([r["us_per_total"] for r in runs]),
                "us_per": {n: _med([r["gateways"][n]["us_per"] for r in runs]) for n in names},
                "errors": sum(r["errors"] for r in runs),
                "paired": {
                    "cpu_total": paired(results, variant, base, lambda r: r["us_per_total"]),
                    "rate": paired(results, variant, base, lambda r: r["rate"]),
                    "p99": paired(results, variant, base, lambda r: r["latency_ms"].get("p99")),
                },
            }
            if len(names) > 1:  # per gateway of the pair, matched by position (orders, payments)
                for i, n in enumerate(names):
                    row["paired"][f"cpu_{n.split('-')[0]}"] = paired(
                        results, variant, base, lambda r, i=i: list(r["gateways"].values())[i]["us_per"]
                    )
            out[variant] = row
    return out


def render(results: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines: list[str] = []
    for experiment, variants in EXPERIMENTS.items():
        unit = "conn" if experiment == "fresh connections" else "req"
        runs = [r for r in results if r["variant"] in variants]
        if not runs:
            continue
        lines += [f"### {experiment}", ""]
        pair = experiment == "mesh pair"
        head = f"| variant | round | {unit}/s | p50 ms | p99 ms | gateway µs CPU/{unit} (user / sys) "
        if pair:
            head += "| orders µs/req | payments µs/req | orders→payments conns open at end / opened in 1st s / after "
        head += f"| upstream new conns | client µs/{unit} | core0 | core1 | other load | errors |"
        cols = head.count("|") - 1
        lines += [head, "|---|" + "---:|" * (cols - 1)]
        for r in sorted(runs, key=lambda r: (variants.index(r["variant"]), r["round"])):
            gws = list(r["gateways"].values())
            user = sum(g["user_us_per"] for g in gws)
            system = sum(g["sys_us_per"] for g in gws)
            lat = r["latency_ms"]
            line = (
                f"| {r['variant']} | {r['round']} | {_fmt(r['rate'], ',.0f')} | {_fmt(lat.get('p50'), '.3f')} "
                f"| {_fmt(lat.get('p99'), '.3f')} | {_fmt(r['us_per_total'], '.1f')} ({user:.1f} / {system:.1f}) "
            )
            if pair:
                c = r.get("connections_to_payments", {})
                line += (
                    f"| {_fmt(gws[0]['us_per'], '.1f')} | {_fmt(gws[1]['us_per'], '.1f')} "
                    f"| {c.get('open_at_end', '-')} / {c.get('opened_first_second', '-')} "
                    f"/ {c.get('opened_after_first_second', '-')} "
                )
            line += (
                f"| {r['upstream_new_connections']} | {_fmt(r['load_us_per'], '.1f')} "
                f"| {_fmt(r['core_busy'].get('core0'), '.0%')} | {_fmt(r['core_busy'].get('core1'), '.0%')} "
                f"| {_fmt(r['other_load_cores'], '.2f')} | {r['errors']} |"
            )
            lines.append(line)
        lines += [
            "",
            f"| variant (medians) | {unit}/s | p99 ms | µs CPU/{unit} | CPU ÷ {BASELINE[experiment]}, paired "
            f"| Δ µs/{unit}, paired (per round) | {unit}/s ÷ base, paired | p99 ÷ base, paired |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for variant in variants:
            s = summary.get(variant)
            if not s:
                continue
            p = s["paired"]
            per_round = " / ".join(f"{d:+.0f}" for d in p["cpu_total"]["deltas"])
            lines.append(
                f"| {variant} | {_fmt(s['rate'], ',.0f')} | {_fmt(s['p99'], '.3f')} | {_fmt(s['us_per_total'], '.1f')} "
                f"| {_fmt(p['cpu_total']['ratio'], '.3f')} | {_fmt(p['cpu_total']['delta'], '+.1f')} ({per_round}) "
                f"| {_fmt(p['rate']['ratio'], '.3f')} | {_fmt(p['p99']['ratio'], '.2f')} |"
            )
            if pair:
                for key in ("cpu_orders", "cpu_payments"):
                    q = p.get(key)
                    if q:
                        own = s["us_per"].get(variant.replace("pair", key[4:]))
                        lines.append(
                            f"| ↳ {key[4:]} only | | | {_fmt(own, '.1f')} "
                            f"| {_fmt(q['ratio'], '.3f')} | {_fmt(q['delta'], '+.1f')} | | |"
                        )
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# main


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per wrk run (default 6)")
    parser.add_argument("--warmup", type=float, default=2.0, help="wrk warm-up seconds (default 2)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    parser.add_argument("--hs-duration", type=float, default=5.0, help="seconds per fresh-connection run (default 5)")
    parser.add_argument("--hs-threads", type=int, default=8, help="conn_client threads (default 8)")
    parser.add_argument("--experiments", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    parser.add_argument(
        "--quiet-wait", type=float, default=20.0, help="wait up to N s for an idle machine (default 20)"
    )
    parser.add_argument("--retries", type=int, default=1, help="re-measure a noisy run up to N times (default 1)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "tls")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 10 or not 1 <= args.duration <= 120 or not 1 <= args.hs_duration <= 120:
        parser.error("--rounds 1..10, --duration and --hs-duration 1..120 s")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    harness._preflight()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / "logs"
    if workdir.exists():
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    workdir.mkdir()
    # The harness itself (and its /proc/net/tcp watcher thread) stays off the gateways' core.
    os.sched_setaffinity(0, {LOAD_CORE})
    signal.signal(signal.SIGTERM, harness._on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    procs = harness.Processes()
    env = Env(args, procs, workdir)
    started = time.monotonic()
    record: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "environment": harness.environment(),
        "method": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    results: list[dict[str, Any]] = []
    code = 0
    try:
        start_all(env)
        record["sanity"] = sanity(env)
        print(f"== sanity: {record['sanity']}", flush=True)
        table = loads(env)
        for rnd in range(1, args.rounds + 1):
            for experiment in args.experiments:
                variants = list(EXPERIMENTS[experiment])
                if rnd % 2 == 0:
                    variants.reverse()
                for variant in variants:
                    results.append(measure(env, table[variant], rnd))
        summary = summarize(results)
        record["results"], record["summary"] = results, summary
        text = render(results, summary)
        print()
        print(text)
        (out / "summary.md").write_text(text)
        if any(r["errors"] for r in results):
            code = 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        code = 130
    except (harness.BenchError, OSError) as error:
        print(f"FAILED: {error}", file=sys.stderr)
        code = 1
    finally:
        exits = {}
        for item in reversed(list(env.started)):
            exits[item.name] = procs.stop(item, grace=15)
        procs.stop_all()
        record["exit_codes"] = exits
        record["elapsed_s"] = round(time.monotonic() - started, 1)
        (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"elapsed {record['elapsed_s']}s; results in {out / 'results.json'}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
