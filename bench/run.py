"""Loopback proxy benchmark: nginx direct vs nginx reverse proxy vs meshgate, in one run.

Run from the repository root::

    python bench/run.py [--duration 10] [--connections 50] [--out bench/out] [--access-log] [--profile]
    python bench/run.py --telemetry [--rounds 2] [--profile]     # the cost of tracing and the access log
    python bench/run.py --policy [--rounds 3] [--profile]        # the cost of JWT authn and Rego authz

Targets (each gets a ~2 s warm-up, then one measured ``wrk --latency`` run):

``direct``
    wrk -> upstream nginx (``return 200`` with a 100-byte body). The baseline. Upstream nginx on core 0.
``nginx-proxy``
    wrk -> nginx reverse proxy (upstream keepalive pool, HTTP/1.1, ``Connection ""``) -> upstream nginx.
``meshgate`` / ``meshgate-w2``
    wrk -> ``python -m gateway run -c <generated yaml> [--workers 2]`` -> upstream nginx.
``meshgate-accesslog`` (with ``--access-log``)
    as ``meshgate`` with ``telemetry.logs.access_log: true``; stdout goes to /dev/null.
``meshgate-trace100`` / ``meshgate-trace10`` / ``meshgate-all`` (with ``--telemetry``)
    as ``meshgate`` (telemetry off: no ``telemetry.tracing``, access log off; metrics are always on) plus
    ``telemetry.tracing`` exporting OTLP/HTTP to ``bench/otlp_sink.py`` at sample_ratio 1.0 / 0.1, and for
    ``meshgate-all`` sample_ratio 1.0 and the access log. The sink runs as its own process on the load core and
    decodes and counts every span; per measured run the harness reports spans received against the expected
    requests x 2 (SERVER + CLIENT) x ratio, and the gateway's CPU split into its event-loop thread and the rest
    (the span export thread). ``--rounds N`` measures the meshgate variants N times, interleaved, and compares
    medians.
``meshgate-jwt`` / ``meshgate-authz-cache`` / ``meshgate-authz-nocache`` / ``meshgate-authz-log`` (with ``--policy``)
    as ``meshgate`` (telemetry off) plus ``authn.jwt`` (RS256, keys from a JWKS URL served by a real
    ``python -m http.server`` on the load core; the one route is ``auth: required``), and for the ``authz`` variants
    the embedded Rego engine on the shipped bundle ``policy/rego`` with ``cache: {ttl: 60s}`` and
    ``decision_log: false`` / without ``cache`` / with the cache and ``decision_log: true`` (stdout to /dev/null).
    The one route is named ``orders-read`` in every variant of the run (``meshgate`` included), and wrk sends
    ``Authorization: Bearer <token>`` to every target: one RS256 token (``bench/policy_setup.py``) whose ``roles``
    claim makes the shipped ``data.json`` allow ``GET`` on that route. The sanity check of a policy variant asserts
    200 with the token (plus ``x-decision-id`` when authz is on) and 401 without it; per measured run the harness
    reports the change of ``meshgate_authz_decisions_total`` by its ``cache`` label (hit / miss / none) from the
    admin ``/metrics``, so the cache hit share and "every request was decided" are checked, not assumed.

Pinning (2-core machine): the process under test runs on core 0 (``taskset -c 0``); wrk (``-t1``) and, for the
proxied targets, the upstream nginx (one worker) share core 1. For ``direct`` the upstream nginx *is* the process
under test, so it is on core 0.

Per target we record wrk's req/s, p50/p75/p90/p99 and error counts, the CPU time (utime+stime from
``/proc/<pid>/stat``, whole process tree) of the process under test, of the upstream nginx and of wrk, divided by the
number of requests (the proxy's split into user/system time), each core's busy share from ``/proc/stat`` (shows which
side saturated), the "other load" on the machine (busy core-seconds not used by our processes; a noisy run is
re-measured, ``--retries``), and the upstream nginx's ``stub_status`` counters (requests proxied, new upstream
connections). Raw results go to ``<out>/results.json``, a Markdown summary to ``<out>/summary.md``. With
``--profile`` meshgate (one worker; ``--profile-target``, by default ``meshgate-trace100`` with ``--telemetry``)
is then loaded again and sampled with py-spy in ``--nonblocking`` mode: ``<out>/profile.svg``,
``<out>/profile.raw.txt`` (per thread) and ``<out>/profile_top.txt``.

Every process the harness starts lives in its own session and is stopped (SIGTERM, then SIGKILL of its process
group) in a ``finally`` block, on errors and on Ctrl-C/SIGTERM too. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROXY_CORE = 0
LOAD_CORE = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Exactly 100 bytes, no characters that nginx would interpret inside a quoted string.
BODY = ("meshgate-bench-" + "0123456789" * 9)[:99] + "\n"
assert len(BODY) == 100
STATUS_PATH = "/__bench_nginx_status"  # stub_status on the upstream nginx: counts connections and requests
ALL_TARGETS = (
    "direct",
    "nginx-proxy",
    "meshgate",
    "meshgate-w2",
    "meshgate-accesslog",
    "meshgate-trace100",
    "meshgate-trace10",
    "meshgate-all",
    "meshgate-jwt",
    "meshgate-authz-cache",
    "meshgate-authz-nocache",
    "meshgate-authz-log",
)
DEFAULT_TARGETS = ("direct", "nginx-proxy", "meshgate", "meshgate-w2")
# --telemetry: the cost of telemetry, against the telemetry-off `meshgate` measured in the same run.
TELEMETRY_TARGETS = ("direct", "nginx-proxy", "meshgate", "meshgate-trace100", "meshgate-trace10", "meshgate-all")
TELEMETRY_BASE = "meshgate"  # the variant the telemetry overhead ratios are taken against
# --policy: the cost of JWT authn and Rego authz, against the policy-free `meshgate` measured in the same run.
POLICY_TARGETS = (
    "direct",
    "nginx-proxy",
    "meshgate",
    "meshgate-jwt",
    "meshgate-authz-cache",
    "meshgate-authz-nocache",
    "meshgate-authz-log",
)
SPANS_PER_REQUEST = 2  # one SERVER span + one CLIENT span per proxied request (one attempt, no retries here)


class BenchError(RuntimeError):
    """A target could not be started or measured."""


# --------------------------------------------------------------------------------------------------------------
# process management


@dataclass
class Managed:
    """A process started by the harness (own session, so its pgid is its pid)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


class Processes:
    """Starts processes and guarantees they are stopped again."""

    def __init__(self) -> None:
        self._items: list[Managed] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log: Path | None = None,
        stdout_devnull: bool = False,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Managed:
        """Start ``argv`` in a new session; stderr (and stdout unless ``stdout_devnull``) go to ``log``."""
        log_file = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed right after Popen
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if stdout_devnull else log_file,
                stderr=log_file,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        finally:
            if log:
                log_file.close()  # type: ignore[union-attr]
        item = Managed(name, proc, log)
        self._items.append(item)
        return item

    def stop(self, item: Managed, sig: int = signal.SIGTERM, grace: float = 10.0) -> int | None:
        """Signal ``item``, wait up to ``grace`` seconds, then SIGKILL its process group. Returns the exit code."""
        if item not in self._items:
            return item.proc.returncode
        self._items.remove(item)
        if item.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                item.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                item.proc.wait(grace)
        # Whatever is left in the group (workers of a killed master, ...) is killed by group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(item.pid, signal.SIGKILL)
        if item.proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                item.proc.wait(5)
        return item.proc.returncode

    def stop_all(self) -> None:
        """Stop everything still running, newest first."""
        for item in reversed(list(self._items)):
            self.stop(item, grace=5.0)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------------------------------------------
# /proc accounting


def _descendants(root: int) -> list[int]:
    """``root`` and all its live descendants (scan of /proc, no CONFIG_PROC_CHILDREN needed)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children[ppid].append(int(entry))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, ()))
    return pids


def cpu_ticks(root: int) -> dict[int, tuple[int, int]]:
    """(utime, stime) in clock ticks of every process in ``root``'s tree, by pid."""
    ticks: dict[int, tuple[int, int]] = {}
    for pid in _descendants(root):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks[pid] = (int(fields[11]), int(fields[12]))  # fields 14 and 15 of proc(5), counted after "comm"
    return ticks


def cpu_delta_s(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> tuple[float, float]:
    """(user, system) CPU seconds between two :func:`cpu_ticks` snapshots (new processes count from zero)."""
    user = sum(u - before.get(pid, (0, 0))[0] for pid, (u, _) in after.items())
    system = sum(st - before.get(pid, (0, 0))[1] for pid, (_, st) in after.items())
    return user / CLK_TCK, system / CLK_TCK


def core_times() -> dict[int, tuple[int, int]]:
    """Per core (busy, total) jiffies from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    with open("/proc/stat") as fh:
        for line in fh:
            m = re.match(r"cpu(\d+)\s+(.*)", line)
            if not m:
                continue
            vals = [int(v) for v in m.group(2).split()]
            idle = vals[3] + vals[4]  # idle + iowait
            total = sum(vals[:8])  # user..steal (guest is already in user)
            out[int(m.group(1))] = (total - idle, total)
    return out


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (at most ``max_wait`` s) until all cores are < ``threshold`` busy over 1 s; returns the seconds waited.

    Other jobs on a shared box inflate latency and lower req/s; starting in a quiet moment makes that less likely, and
    ``other_load_cores`` in the results shows whether it happened anyway.
    """
    started = time.monotonic()
    while True:
        before = core_times()
        time.sleep(1.0)
        after = core_times()
        busy = sum(a[0] - before[c][0] for c, a in after.items())
        total = sum(a[1] - before[c][1] for c, a in after.items())
        waited = time.monotonic() - started
        if total <= 0 or busy / total < threshold or waited >= max_wait:
            return round(waited, 1)


def core_busy(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict[str, float]:
    """Busy share (0..1) of each core between two :func:`core_times` snapshots."""
    busy: dict[str, float] = {}
    for core, (b1, t1) in after.items():
        b0, t0 = before.get(core, (0, 0))
        busy[f"core{core}"] = round((b1 - b0) / (t1 - t0), 3) if t1 > t0 else 0.0
    return busy


# --------------------------------------------------------------------------------------------------------------
# wrk

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unparsable wrk time {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


@dataclass
class WrkResult:
    """One parsed ``wrk --latency`` run."""

    requests: int
    seconds: float
    rps: float
    latency_ms: dict[str, float]
    socket_errors: dict[str, int]
    non_2xx_3xx: int
    wrk_cpu_s: float
    output: str

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values()) + self.non_2xx_3xx


def parse_wrk(output: str, wrk_cpu_s: float = 0.0) -> WrkResult:
    """Parse the text wrk prints with ``--latency``."""
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not m or not rps:
        raise BenchError(f"wrk output not understood:\n{output}")
    latency = {f"p{p}": _ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", output, re.M)}
    avg = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", output)
    if avg:
        latency["avg"] = _ms(avg.group(1))
        latency["max"] = _ms(avg.group(3))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    socket_errors: dict[str, int] = {}
    if sock:
        socket_errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        requests=int(m.group(1)),
        seconds=_ms(m.group(2)) / 1e3,
        rps=float(rps.group(1)),
        latency_ms=latency,
        socket_errors=socket_errors,
        non_2xx_3xx=int(non2xx.group(1)) if non2xx else 0,
        wrk_cpu_s=wrk_cpu_s,
        output=output,
    )


def run_wrk(
    url: str,
    duration: float,
    connections: int,
    workdir: Path,
    timeout_s: float = 5.0,
    headers: Sequence[str] = (),
) -> WrkResult:
    """Run ``taskset -c LOAD_CORE wrk -t1`` for ``duration`` seconds; also returns wrk's own CPU time.

    ``headers`` (``"Name: value"``) are sent on every request (wrk ``-H``).
    """
    out_path = workdir / "wrk.out"
    argv = [
        "taskset",
        "-c",
        str(LOAD_CORE),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        f"--timeout={timeout_s:g}s",
        *(arg for header in headers for arg in ("-H", header)),
        url,
    ]
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + duration + 30
    try:
        while True:  # wait4 gives wrk's rusage (taskset execs wrk, same pid)
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                raise BenchError("wrk did not finish in time")
            time.sleep(0.05)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    text = out_path.read_text(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"wrk exited {proc.returncode}:\n{text}")
    return parse_wrk(text, rusage.ru_utime + rusage.ru_stime)


# --------------------------------------------------------------------------------------------------------------
# targets


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(
    url: str, timeout: float = 2.0, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """GET ``url`` (no proxies), returning status, headers and body; HTTP errors are returned, not raised."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(request, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


def wait_ready(url: str, item: Managed, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers 200; fail early if the process exits."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if item.proc.poll() is not None:
            raise BenchError(f"{item.name} exited with {item.proc.returncode} before ready{_log_tail(item)}")
        try:
            status, _, _ = http_get(url, timeout=1.0)
            if status == 200:
                return
            last = f"status {status}"
        except OSError as error:
            last = str(error)
        time.sleep(0.1)
    raise BenchError(f"{item.name} not ready at {url} after {timeout:g}s ({last}){_log_tail(item)}")


def _log_tail(item: Managed, lines: int = 30) -> str:
    if not item.log or not item.log.exists():
        return ""
    tail = item.log.read_text(errors="replace").splitlines()[-lines:]
    return "\n--- " + str(item.log) + " (tail) ---\n" + "\n".join(tail)


_NGINX_COMMON = """\
daemon off;
master_process on;
worker_processes 1;
{user}pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
{body}
}}
"""

_UPSTREAM_SERVER = """\
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type text/plain;
            return 200 "{body}";
        }}
        location = {status_path} {{
            stub_status;
        }}
    }}"""

_PROXY_SERVER = """\
    upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Request-Id $request_id;
        }}
    }}"""


def upstream_block(port: int) -> str:
    """The upstream server block: ``return 200`` with :data:`BODY` (its trailing newline written as ``\\n``)."""
    return _UPSTREAM_SERVER.format(port=port, body=BODY.rstrip("\n") + "\\n", status_path=STATUS_PATH)


def upstream_counters(port: int) -> tuple[int, int]:
    """(accepted connections, requests) so far, from the upstream nginx's ``stub_status``.

    Each reading is itself one connection and one request, counted in the reading it returns.
    """
    _, _, body = http_get(f"http://127.0.0.1:{port}{STATUS_PATH}")
    m = re.search(rb"\n\s*(\d+)\s+(\d+)\s+(\d+)\s*\n", body)
    if not m:
        raise BenchError(f"unexpected stub_status answer {body[:200]!r}")
    return int(m.group(1)), int(m.group(3))


def proxy_block(port: int, upstream: int) -> str:
    """The reverse-proxy server block in front of ``upstream``."""
    return _PROXY_SERVER.format(port=port, upstream=upstream)


def nginx_conf(prefix: Path, server_block: str) -> str:
    """A self-contained nginx config: no /etc includes, everything under ``prefix``, one worker."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    return _NGINX_COMMON.format(user=user, prefix=prefix, body=server_block)


def start_nginx(procs: Processes, name: str, workdir: Path, server_block: str, core: int, port: int) -> Managed:
    """Start one nginx (``daemon off``, own prefix) pinned to ``core`` and wait until it serves ``port``."""
    prefix = workdir / name
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, server_block))
    argv = ["taskset", "-c", str(core), "nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    item = procs.start(name, argv, log=prefix / "stderr.log")
    wait_ready(f"http://127.0.0.1:{port}/", item, timeout=10)
    return item


def meshgate_yaml(
    listen: int,
    admin: int,
    upstream: int,
    access_log: bool,
    otlp_endpoint: str | None = None,
    sample_ratio: float | None = None,
    max_queue: int | None = None,
    route_name: str = "all",
    policy: str = "",
) -> str:
    """The meshgate config used for all meshgate targets (one catch-all route, one static endpoint).

    With ``otlp_endpoint`` (and ``sample_ratio``) it adds ``telemetry.tracing`` (OTLP http/protobuf); otherwise
    there is no tracing section and nothing is exported. ``policy`` is appended as it is (``authn`` / ``authz``
    sections); when it has an ``authn`` section the route is ``auth: required``.
    """
    auth = ", auth: required" if policy.startswith("authn:") or "\nauthn:" in policy else ""
    logs = f"logs: {{level: info, access_log: {'true' if access_log else 'false'}}}"
    if otlp_endpoint is None:
        telemetry = f"telemetry: {{{logs}}}\n"
    else:
        batch = f", batch: {{max_queue: {max_queue}}}" if max_queue else ""
        telemetry = (
            "telemetry:\n"
            f'  tracing: {{otlp_endpoint: "{otlp_endpoint}", protocol: http/protobuf, '
            f"sample_ratio: {sample_ratio if sample_ratio is not None else 1.0}{batch}}}\n"
            f"  {logs}\n"
        )
    return f"""\
service: bench
listen: 127.0.0.1:{listen}
admin: 127.0.0.1:{admin}
routes:
  - {{name: {route_name}, match: {{path_prefix: /}}, cluster: upstream{auth}}}
clusters:
  - {{name: upstream, endpoints: ["127.0.0.1:{upstream}"], lb: round_robin}}
{telemetry}{policy}"""


def start_meshgate(
    procs: Processes,
    name: str,
    workdir: Path,
    upstream: int,
    workers: int,
    access_log: bool,
    *,
    otlp_endpoint: str | None = None,
    sample_ratio: float | None = None,
    max_queue: int | None = None,
    route_name: str = "all",
    policy: str = "",
    stdout_devnull: bool = False,
) -> tuple[Managed, int, int]:
    """Start meshgate pinned to PROXY_CORE; wait for /readyz on the admin port.

    Returns (process, listen port, admin port). stdout goes to /dev/null with ``access_log`` or ``stdout_devnull``
    (the decision log), to the process log otherwise.
    """
    listen, admin = free_port(), free_port()
    cfg = workdir / f"{name}.yaml"
    cfg.write_text(
        meshgate_yaml(listen, admin, upstream, access_log, otlp_endpoint, sample_ratio, max_queue, route_name, policy)
    )
    argv = ["taskset", "-c", str(PROXY_CORE), sys.executable, "-m", "gateway", "run", "-c", str(cfg)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # The access log and the decision log are one JSON line per request on stdout: send them to /dev/null.
    devnull = access_log or stdout_devnull
    item = procs.start(name, argv, log=workdir / f"{name}.log", stdout_devnull=devnull, cwd=REPO, env=env)
    wait_ready(f"http://127.0.0.1:{admin}/readyz", item, timeout=60)
    return item, listen, admin


def start_sink(procs: Processes, workdir: Path, name: str = "otlp-sink") -> tuple[Managed, int]:
    """Start ``bench/otlp_sink.py`` pinned to LOAD_CORE (next to wrk); returns (process, port) once it answers."""
    port = free_port()
    argv = ["taskset", "-c", str(LOAD_CORE), sys.executable, str(REPO / "bench" / "otlp_sink.py"), "--port", str(port)]
    item = procs.start(name, argv, log=workdir / f"{name}.log", cwd=REPO)
    wait_ready(f"http://127.0.0.1:{port}/stats", item, timeout=30)
    return item, port


def sink_stats(port: int) -> dict[str, Any]:
    """The sink's counters (``export_requests``, ``spans``, ``spans_by_kind``, ``body_bytes``, ``errors``)."""
    status, _, body = http_get(f"http://127.0.0.1:{port}/stats")
    if status != 200:
        raise BenchError(f"otlp sink /stats answered {status}")
    stats: dict[str, Any] = json.loads(body)
    return stats


def wait_exported(port: int, settle: float = 0.5, max_wait: float = 5.0) -> tuple[dict[str, Any], float]:
    """Wait until the sink's span count has not moved for ``settle`` s (the batch delay is 0.2 s); returns (stats,
    seconds waited). Bounded by ``max_wait``: a gateway that keeps exporting does not hang the run."""
    started = time.monotonic()
    stats = sink_stats(port)
    still_since = started
    while True:
        time.sleep(0.1)
        now = time.monotonic()
        current = sink_stats(port)
        if current["spans"] != stats["spans"] or current["export_requests"] != stats["export_requests"]:
            stats, still_since = current, now
        elif now - still_since >= settle or now - started >= max_wait:
            return current, round(now - started, 2)
        if now - started >= max_wait:
            return current, round(now - started, 2)


@dataclass(frozen=True)
class PolicyEnv:
    """``--policy``: the JWKS server's URL, the bearer token and the route name every meshgate variant uses."""

    jwks_url: str
    token: str
    route: str
    claims: dict[str, Any]

    @property
    def headers(self) -> tuple[str, ...]:
        return (f"Authorization: Bearer {self.token}",)

    def yaml(self, target: Target) -> str:
        """The ``authn`` / ``authz`` sections of ``target`` (empty for a policy-free variant)."""
        setup = _policy_setup()
        text = setup.authn_yaml(self.jwks_url) if target.authn else ""
        if target.authz:
            text += setup.authz_yaml(cache=target.authz_cache, decision_log=target.decision_log)
        return text


def _policy_setup() -> Any:
    """``bench/policy_setup.py``, imported on first use (pyjwt/cryptography are only needed with --policy)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench import policy_setup

    return policy_setup


def start_jwks(procs: Processes, workdir: Path, name: str = "jwks") -> tuple[Managed, PolicyEnv]:
    """A fresh key pair and token, and ``python -m http.server`` on LOAD_CORE publishing ``jwks.json``.

    The gateway fetches the keys at start-up (and every 5 min, the default ``refresh``), so this process is idle
    during the measurements; it runs for the whole run and is stopped with everything else.
    """
    setup = _policy_setup()
    setup.check_policy_allows()
    identity = setup.make_identity(workdir / name)
    port = free_port()
    argv = ["taskset", "-c", str(LOAD_CORE), sys.executable, "-m", "http.server", str(port)]
    argv += ["--bind", "127.0.0.1", "--directory", str(identity.jwks_dir)]
    item = procs.start(name, argv, log=workdir / f"{name}.log", cwd=identity.jwks_dir)
    url = f"http://127.0.0.1:{port}/jwks.json"
    wait_ready(url, item, timeout=30)
    return item, PolicyEnv(url, identity.token, setup.ROUTE, dict(identity.claims))


# --------------------------------------------------------------------------------------------------------------
# measurement


@dataclass(frozen=True)
class Target:
    """One thing to measure."""

    name: str
    kind: str  # direct | nginx-proxy | meshgate
    description: str
    workers: int = 1
    access_log: bool = False
    sample_ratio: float | None = None  # None: no telemetry.tracing section (nothing exported)
    authn: bool = False  # authn.jwt (keys from the bench's JWKS server); the route becomes auth: required
    authz: bool = False  # authz: embedded engine on the shipped bundle policy/rego
    authz_cache: bool = False  # authz.cache: {ttl: 60s}
    decision_log: bool = False  # authz.decision_log (stdout to /dev/null)

    @property
    def exports(self) -> bool:
        return self.sample_ratio is not None

    @property
    def policy(self) -> bool:
        return self.authn or self.authz


TARGETS = {
    "direct": Target("direct", "direct", f"wrk -> nginx upstream (upstream on core {PROXY_CORE})"),
    "nginx-proxy": Target(
        "nginx-proxy", "nginx-proxy", "wrk -> nginx reverse proxy (1 worker, keepalive pool) -> nginx upstream"
    ),
    "meshgate": Target("meshgate", "meshgate", "wrk -> meshgate (1 worker, access log off) -> nginx upstream"),
    "meshgate-w2": Target(
        "meshgate-w2", "meshgate", "wrk -> meshgate --workers 2 (both on core 0) -> nginx upstream", workers=2
    ),
    "meshgate-accesslog": Target(
        "meshgate-accesslog",
        "meshgate",
        "wrk -> meshgate (1 worker, access log on, stdout to /dev/null) -> nginx upstream",
        access_log=True,
    ),
    "meshgate-trace100": Target(
        "meshgate-trace100",
        "meshgate",
        "wrk -> meshgate (tracing, sample_ratio 1.0, OTLP/HTTP to the sink; access log off) -> nginx upstream",
        sample_ratio=1.0,
    ),
    "meshgate-trace10": Target(
        "meshgate-trace10",
        "meshgate",
        "wrk -> meshgate (tracing, sample_ratio 0.1, OTLP/HTTP to the sink; access log off) -> nginx upstream",
        sample_ratio=0.1,
    ),
    "meshgate-all": Target(
        "meshgate-all",
        "meshgate",
        "wrk -> meshgate (tracing 1.0 + access log to /dev/null + metrics) -> nginx upstream",
        access_log=True,
        sample_ratio=1.0,
    ),
    "meshgate-jwt": Target(
        "meshgate-jwt",
        "meshgate",
        "wrk -> meshgate (authn: RS256 JWT verified against JWKS keys; no authz; telemetry off) -> nginx upstream",
        authn=True,
    ),
    "meshgate-authz-cache": Target(
        "meshgate-authz-cache",
        "meshgate",
        "wrk -> meshgate (JWT authn + embedded Rego authz, policy/rego, cache ttl 60s, decision_log false) -> nginx "
        "upstream",
        authn=True,
        authz=True,
        authz_cache=True,
    ),
    "meshgate-authz-nocache": Target(
        "meshgate-authz-nocache",
        "meshgate",
        "wrk -> meshgate (JWT authn + embedded Rego authz, policy/rego, no cache, decision_log false) -> nginx "
        "upstream",
        authn=True,
        authz=True,
    ),
    "meshgate-authz-log": Target(
        "meshgate-authz-log",
        "meshgate",
        "wrk -> meshgate (JWT authn + embedded Rego authz, cache ttl 60s, decision_log true to /dev/null) -> nginx "
        "upstream",
        authn=True,
        authz=True,
        authz_cache=True,
        decision_log=True,
    ),
}


@dataclass
class TargetResult:
    """Everything measured for one target."""

    target: str
    description: str
    ok: bool = True
    error: str | None = None
    rps: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    requests: int | None = None
    seconds: float | None = None
    errors: int | None = None
    socket_errors: dict[str, int] = field(default_factory=dict)
    non_2xx_3xx: int | None = None
    proxy_cpu_s: float | None = None
    proxy_us_per_req: float | None = None
    proxy_user_us_per_req: float | None = None
    proxy_sys_us_per_req: float | None = None
    proxy_cpu_util: float | None = None
    upstream_us_per_req: float | None = None
    wrk_us_per_req: float | None = None
    upstream_new_connections: int | None = None
    upstream_requests: int | None = None
    core_busy: dict[str, float] = field(default_factory=dict)
    other_load_cores: float | None = None
    quiet_wait_s: float | None = None
    attempt: int | None = None
    proxy_pids: list[int] = field(default_factory=list)
    sanity: dict[str, Any] = field(default_factory=dict)
    warmup_rps: float | None = None
    exit_code: int | None = None
    round: int = 1
    # CPU of the process under test split by thread: the main (event loop) thread of each process, and the rest
    # (the span export thread, the log writer, executors); summed over the process tree.
    proxy_main_us_per_req: float | None = None
    proxy_other_threads_us_per_req: float | None = None
    # tracing targets: what the OTLP sink received for the requests of the measured run
    sample_ratio: float | None = None
    spans_received: int | None = None
    spans_expected: float | None = None  # upstream requests x 2 spans x sample ratio
    spans_by_kind: dict[str, int] = field(default_factory=dict)
    export_requests: int | None = None
    export_bytes: int | None = None
    export_errors: int | None = None
    export_drain_s: float | None = None  # after wrk ended, until the sink stopped receiving
    proxy_drain_cpu_s: float | None = None  # the gateway's CPU in that drain (included in proxy_us_per_req)
    sink_us_per_req: float | None = None
    # policy targets: meshgate_authz_decisions_total over the measured run, by its `cache` label (hit / miss /
    # none) and by its `decision` label (allow / deny / error), and meshgate_authn_failures_total
    authz_by_cache: dict[str, int] = field(default_factory=dict)
    authz_by_decision: dict[str, int] = field(default_factory=dict)
    authn_failures: int | None = None
    wrk_output: str | None = None

    @property
    def p99_ms(self) -> float | None:
        return self.latency_ms.get("p99")

    @property
    def authz_decided(self) -> int | None:
        return sum(self.authz_by_cache.values()) if self.authz_by_cache else None

    @property
    def cache_hit_share(self) -> float | None:
        decided = self.authz_decided
        return self.authz_by_cache.get("hit", 0) / decided if decided else None

    @property
    def spans_exported_share(self) -> float | None:
        if self.spans_received is None or not self.spans_expected:
            return None
        return self.spans_received / self.spans_expected


def sanity_check(url: str, request_headers: Sequence[str] = ()) -> dict[str, Any]:
    """One request through the target (with the headers wrk will send): must be 200 with the 100-byte body."""
    sent = dict(h.split(": ", 1) for h in request_headers)
    status, headers, body = http_get(url, headers=sent)
    if status != 200 or body != BODY.encode():
        raise BenchError(f"sanity GET {url}: status {status}, body {body[:200]!r}")
    return {"status": status, "body_bytes": len(body), "headers": headers}


def policy_sanity_check(target: Target, url: str, request_headers: Sequence[str]) -> dict[str, Any]:
    """Prove the policy path runs: with the token 200 (and an ``x-decision-id`` when authz is on), without it 401."""
    out = sanity_check(url, request_headers)
    with_token = {k.lower(): v for k, v in out["headers"].items()}
    if target.authz and not with_token.get("x-decision-id"):
        raise BenchError(f"sanity GET {url} with the token: 200 but no x-decision-id header: authz did not run")
    if not target.authz and "x-decision-id" in with_token:
        raise BenchError(f"sanity GET {url}: x-decision-id although {target.name} has no authz")
    status, headers, body = http_get(url)
    if target.policy:
        if status != 401:
            raise BenchError(f"sanity GET {url} without a token: status {status} (expected 401), body {body[:200]!r}")
    elif status != 200:
        raise BenchError(f"sanity GET {url} without a token: status {status}, body {body[:200]!r}")
    without = {k.lower(): v for k, v in headers.items()}
    out["decision_id"] = with_token.get("x-decision-id")
    out["without_token"] = {"status": status, "www-authenticate": without.get("www-authenticate")}
    return out


_METRIC_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_counts(admin_port: int, name: str, label: str) -> dict[str, float]:
    """The samples of counter ``name`` on the admin ``/metrics``, summed by the value of ``label``."""
    status, _, body = http_get(f"http://127.0.0.1:{admin_port}/metrics")
    if status != 200:
        raise BenchError(f"admin /metrics answered {status}")
    out: dict[str, float] = collections.defaultdict(float)
    for line in body.decode(errors="replace").splitlines():
        m = _METRIC_LINE.match(line)
        if not m or m.group("name") != name:
            continue
        labels = dict(_LABEL.findall(m.group("labels") or ""))
        out[labels.get(label, "")] += float(m.group("value"))
    return dict(out)


def _count_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {k: round(v - before.get(k, 0.0)) for k, v in sorted(after.items()) if round(v - before.get(k, 0.0))}


@dataclass
class Running:
    """A started target: where to send load and what to account."""

    url: str
    root_pid: int  # process under test (CPU accounting over its process tree)
    upstream_pid: int | None  # the upstream nginx behind a proxy; None for direct
    status_port: int  # the nginx whose stub_status counts the requests that reached the upstream
    exit_code: int | None = None  # after SIGTERM
    sink_pid: int | None = None  # the OTLP sink (running for the whole run when any target traces)
    sink_port: int | None = None  # set only when this target exports spans to it
    admin_port: int | None = None  # meshgate's admin listener (/metrics)
    headers: tuple[str, ...] = ()  # sent by wrk and by the sanity request (the bearer token with --policy)


NOISY_CORES = 0.15  # other load above this (in cores) during a measured run triggers a re-measurement


def measure(target: Target, run: Running, args: argparse.Namespace, workdir: Path) -> TargetResult:
    """Sanity request and warm-up, then the measured wrk run (re-measured while other load spoiled it).

    At most ``1 + args.retries`` measured runs; the one with the least other load is kept. A target that exports
    spans must have delivered some to the sink by the end of the warm-up, or it fails.
    """
    # --policy: every target gets the token; the policy variants must prove that they check it
    sanity = policy_sanity_check(target, run.url, run.headers) if run.headers else sanity_check(run.url)
    before = sink_stats(run.sink_port) if run.sink_port else None
    print(f"  [{target.name}] warm-up {args.warmup:g}s ...", flush=True)
    warmup_rps = run_wrk(run.url, args.warmup, args.connections, workdir, headers=run.headers).rps
    if run.sink_port and before is not None:
        after, _ = wait_exported(run.sink_port)
        if after["spans"] <= before["spans"]:
            raise BenchError(f"no spans reached the OTLP sink during the warm-up ({after})")
    best: TargetResult | None = None
    for attempt in range(1, args.retries + 2):
        waited = wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
        print(f"  [{target.name}] measuring {args.duration:g}s (attempt {attempt}) ...", flush=True)
        result = measure_once(target, run, args, workdir)
        result.sanity, result.warmup_rps, result.quiet_wait_s, result.attempt = sanity, warmup_rps, waited, attempt
        if best is None or (result.other_load_cores or 0.0) < (best.other_load_cores or 0.0):
            best = result
        if (result.other_load_cores or 0.0) <= NOISY_CORES:
            break
        print(f"  [{target.name}] other load {result.other_load_cores} cores during the run", flush=True)
    assert best is not None
    return best


def main_thread_ticks(root: int) -> int:
    """utime+stime of the main thread of every process in ``root``'s tree (``/proc/<pid>/task/<pid>/stat``)."""
    total = 0
    for pid in _descendants(root):
        try:
            with open(f"/proc/{pid}/task/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def measure_once(target: Target, run: Running, args: argparse.Namespace, workdir: Path) -> TargetResult:
    """One measured wrk run with CPU, per-core, upstream-connection and (when tracing) span accounting around it.

    For a target that exports spans, the sink must be idle before the run starts (the warm-up's spans delivered),
    and after wrk ends the harness waits until the last batch has arrived. The gateway's CPU per request includes
    that drain (it is the export of the run's own spans); per-core busy shares, CPU utilisation and "other load"
    cover the wrk run only.
    """
    result = TargetResult(target.name, target.description, sample_ratio=target.sample_ratio)
    proxy_root, upstream_root, sink_root = run.root_pid, run.upstream_pid, run.sink_pid
    stats0 = wait_exported(run.sink_port)[0] if run.sink_port else None
    policy_metrics = target.policy and run.admin_port is not None
    if policy_metrics:
        assert run.admin_port is not None
        authz0 = metric_counts(run.admin_port, "meshgate_authz_decisions_total", "cache")
        decision0 = metric_counts(run.admin_port, "meshgate_authz_decisions_total", "decision")
        authn0 = metric_counts(run.admin_port, "meshgate_authn_failures_total", "reason")
    accepts0, requests0 = upstream_counters(run.status_port)
    p0 = cpu_ticks(proxy_root)
    m0 = main_thread_ticks(proxy_root)
    u0 = cpu_ticks(upstream_root) if upstream_root else {}
    k0 = cpu_ticks(sink_root) if sink_root else {}
    c0 = core_times()
    t0 = time.monotonic()
    wrk = run_wrk(run.url, args.duration, args.connections, workdir, headers=run.headers)
    wall = time.monotonic() - t0
    c1 = core_times()
    p1 = cpu_ticks(proxy_root)
    u1 = cpu_ticks(upstream_root) if upstream_root else {}
    k1 = cpu_ticks(sink_root) if sink_root else {}
    accepts1, requests1 = upstream_counters(run.status_port)
    if policy_metrics:
        assert run.admin_port is not None
        authz1 = metric_counts(run.admin_port, "meshgate_authz_decisions_total", "cache")
        decision1 = metric_counts(run.admin_port, "meshgate_authz_decisions_total", "decision")
        authn1 = metric_counts(run.admin_port, "meshgate_authn_failures_total", "reason")
        result.authz_by_cache = _count_delta(authz0, authz1)
        result.authz_by_decision = _count_delta(decision0, decision1)
        result.authn_failures = sum(_count_delta(authn0, authn1).values())
    # minus the second stub_status reading itself
    result.upstream_new_connections = accepts1 - accepts0 - 1
    result.upstream_requests = requests1 - requests0 - 1
    p2, k2 = p1, k1
    if run.sink_port and stats0 is not None:
        stats1, result.export_drain_s = wait_exported(run.sink_port)
        p2 = cpu_ticks(proxy_root)
        k2 = cpu_ticks(sink_root) if sink_root else {}
        result.spans_received = stats1["spans"] - stats0["spans"]
        result.export_requests = stats1["export_requests"] - stats0["export_requests"]
        result.export_bytes = stats1["body_bytes"] - stats0["body_bytes"]
        result.export_errors = stats1["errors"] - stats0["errors"]
        result.spans_by_kind = {
            kind: n - stats0["spans_by_kind"].get(kind, 0)
            for kind, n in stats1["spans_by_kind"].items()
            if n - stats0["spans_by_kind"].get(kind, 0)
        }
        ratio = target.sample_ratio if target.sample_ratio is not None else 1.0
        result.spans_expected = round(result.upstream_requests * SPANS_PER_REQUEST * ratio, 1)
    m2 = main_thread_ticks(proxy_root)
    proxy_user, proxy_sys = cpu_delta_s(p0, p1)
    window_cpu = proxy_user + proxy_sys
    proxy_user, proxy_sys = cpu_delta_s(p0, p2)  # including the export of the run's last spans
    proxy_cpu = proxy_user + proxy_sys
    result.proxy_drain_cpu_s = round(proxy_cpu - window_cpu, 3) if run.sink_port else None
    upstream_cpu = sum(cpu_delta_s(u0, u1))
    sink_cpu = sum(cpu_delta_s(k0, k1))
    busy_s = sum(b1 - c0[core][0] for core, (b1, _) in c1.items()) / CLK_TCK
    # Busy core-seconds not spent by the processes of this benchmark (other jobs, unaccounted kernel work), as cores.
    ours = window_cpu + upstream_cpu + sink_cpu + wrk.wrk_cpu_s
    result.other_load_cores = round((busy_s - ours) / wall, 2) if wall > 0 else None
    result.rps = wrk.rps
    result.latency_ms = wrk.latency_ms
    result.requests = wrk.requests
    result.seconds = wrk.seconds
    result.errors = wrk.errors
    result.socket_errors = wrk.socket_errors
    result.non_2xx_3xx = wrk.non_2xx_3xx
    result.proxy_cpu_s = round(proxy_cpu, 3)
    result.proxy_pids = sorted(p2)
    if wrk.requests:
        per_req = 1e6 / wrk.requests
        result.proxy_us_per_req = round(proxy_cpu * per_req, 2)
        result.proxy_user_us_per_req = round(proxy_user * per_req, 2)
        result.proxy_sys_us_per_req = round(proxy_sys * per_req, 2)
        main_s = (m2 - m0) / CLK_TCK
        result.proxy_main_us_per_req = round(main_s * per_req, 2)
        result.proxy_other_threads_us_per_req = round((proxy_cpu - main_s) * per_req, 2)
        result.wrk_us_per_req = round(wrk.wrk_cpu_s * per_req, 2)
        if upstream_root:
            result.upstream_us_per_req = round(upstream_cpu * per_req, 2)
        if run.sink_port and sink_root:
            result.sink_us_per_req = round(sum(cpu_delta_s(k0, k2)) * per_req, 2)
    result.proxy_cpu_util = round(window_cpu / wall, 3) if wall > 0 else None
    result.core_busy = core_busy(c0, c1)
    result.wrk_output = wrk.output
    if wrk.errors:
        result.error = f"wrk reported {wrk.errors} errors ({wrk.socket_errors}, non-2xx {wrk.non_2xx_3xx})"
    return result


@contextlib.contextmanager
def running(
    target: Target,
    procs: Processes,
    workdir: Path,
    upstream: Managed | None,
    up_port: int,
    sink: tuple[Managed, int] | None = None,
    max_queue: int | None = None,
    policy: PolicyEnv | None = None,
) -> Iterator[Running]:
    """Start the process under test pinned to PROXY_CORE, yield it as :class:`Running`, stop it (SIGTERM).

    With ``policy`` (``--policy``) wrk sends its bearer token to every target, and meshgate's route is named
    ``policy.route`` in every variant, with or without a policy.
    """
    if target.policy and policy is None:
        raise BenchError(f"{target.name} needs the JWKS server and token of --policy")
    admin: int | None = None
    if target.kind == "direct":
        port = free_port()
        item = start_nginx(procs, "upstream-direct", workdir, upstream_block(port), PROXY_CORE, port)
        run = Running(f"http://127.0.0.1:{port}/", item.pid, None, port)
    else:
        assert upstream is not None
        if target.kind == "nginx-proxy":
            port = free_port()
            item = start_nginx(procs, "nginx-proxy", workdir, proxy_block(port, up_port), PROXY_CORE, port)
        else:
            endpoint = None
            if target.exports:
                if sink is None:
                    raise BenchError("a tracing target needs the OTLP sink")
                endpoint = f"http://127.0.0.1:{sink[1]}"
            item, port, admin = start_meshgate(
                procs,
                target.name,
                workdir,
                up_port,
                target.workers,
                target.access_log,
                otlp_endpoint=endpoint,
                sample_ratio=target.sample_ratio,
                max_queue=max_queue,
                route_name=policy.route if policy else "all",
                policy=policy.yaml(target) if policy else "",
                stdout_devnull=target.decision_log,
            )
        run = Running(f"http://127.0.0.1:{port}/", item.pid, upstream.pid, up_port, admin_port=admin)
    if policy is not None:
        run.headers = policy.headers
    if sink is not None:
        run.sink_pid = sink[0].pid
        run.sink_port = sink[1] if target.exports else None
    try:
        yield run
    finally:
        run.exit_code = procs.stop(item, grace=15)


def target_order(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(target, round) in measuring order: the baselines once, the meshgate variants ``--rounds`` times, interleaved
    (A B C A B C, so a slow drift of the machine spreads over all variants instead of biasing one)."""
    if args.targets is not None:
        names = list(args.targets)
    elif args.telemetry or args.policy:
        names = list(TELEMETRY_TARGETS if args.telemetry else POLICY_TARGETS)
    else:
        names = list(DEFAULT_TARGETS)
    extra = ["meshgate-accesslog"] if args.access_log else []
    if args.telemetry:
        extra += [t for t in TELEMETRY_TARGETS if t.startswith("meshgate-")]
    if args.policy:
        extra += [t for t in POLICY_TARGETS if t.startswith("meshgate")]
    names += [t for t in extra if t not in names]
    baselines = [n for n in names if TARGETS[n].kind != "meshgate"]
    variants = [n for n in names if TARGETS[n].kind == "meshgate"]
    return [(n, 1) for n in baselines] + [(n, r) for r in range(1, args.rounds + 1) for n in variants]


def run_targets(args: argparse.Namespace, procs: Processes, workdir: Path) -> list[TargetResult]:
    """Measure every selected target in order; a target that fails is recorded and the run goes on.

    One upstream nginx (pinned to LOAD_CORE) serves all proxied targets; ``direct`` gets its own on PROXY_CORE. When a
    target traces, one OTLP sink (``bench/otlp_sink.py``, on LOAD_CORE) receives the spans of all of them.
    """
    order = target_order(args)
    results: list[TargetResult] = []
    upstream: Managed | None = None
    sink: tuple[Managed, int] | None = None
    jwks: Managed | None = None
    policy: PolicyEnv | None = None
    up_port = free_port()
    try:
        if any(TARGETS[name].exports for name, _ in order):
            sink = start_sink(procs, workdir)
            print(f"== OTLP sink on core {LOAD_CORE}: http://127.0.0.1:{sink[1]}/v1/traces", flush=True)
        if args.policy or any(TARGETS[name].policy for name, _ in order):
            jwks, policy = start_jwks(procs, workdir)
            print(
                f"== JWKS on core {LOAD_CORE}: {policy.jwks_url}; RS256 token of {len(policy.token)} bytes, "
                f"roles {policy.claims.get('roles')}, route {policy.route}",
                flush=True,
            )
        for name, rnd in order:
            target = TARGETS[name]
            label = f"{name} (round {rnd})" if args.rounds > 1 and target.kind == "meshgate" else name
            print(f"== {label}: {target.description}", flush=True)
            if target.kind != "direct" and upstream is None:
                upstream = start_nginx(procs, "upstream", workdir, upstream_block(up_port), LOAD_CORE, up_port)
            try:
                with running(target, procs, workdir, upstream, up_port, sink, args.trace_max_queue, policy) as run:
                    result = measure(target, run, args, workdir)
                result.exit_code = run.exit_code
                result.round = rnd
                if run.exit_code != 0:
                    print(f"  [{name}] note: exit code {run.exit_code} after SIGTERM", flush=True)
                if result.spans_received is not None:
                    print(
                        f"  [{name}] spans received {result.spans_received:,} of {result.spans_expected:,.0f} expected "
                        f"({_fmt(result.spans_exported_share, '.1%')}; {result.spans_by_kind}), "
                        f"{result.export_requests} export requests",
                        flush=True,
                    )
                if result.authz_by_cache or result.authn_failures:
                    print(
                        f"  [{name}] authz decisions by cache {result.authz_by_cache} "
                        f"(by decision {result.authz_by_decision}) for {result.requests:,} requests; "
                        f"authn failures {result.authn_failures}",
                        flush=True,
                    )
                results.append(result)
            except (BenchError, OSError) as error:
                print(f"  [{name}] FAILED: {error}", flush=True)
                results.append(TargetResult(name, target.description, ok=False, error=str(error), round=rnd))
    finally:
        if upstream:
            procs.stop(upstream)
        if sink:
            procs.stop(sink[0])
        if jwks:
            procs.stop(jwks)
    return results


# --------------------------------------------------------------------------------------------------------------
# profiling


def profile_meshgate(args: argparse.Namespace, procs: Processes, workdir: Path, out: Path) -> dict[str, Any]:
    """Load a single-worker meshgate variant and sample it with py-spy: flamegraph, raw stacks, top self-time list.

    The variant is ``args.profile_target`` (a tracing one gets its own OTLP sink on LOAD_CORE). The raw pass is
    recorded with ``--threads``, so the summary can split the samples between the event loop and other threads
    (the span export thread).
    """
    if not shutil.which("py-spy"):
        raise BenchError("py-spy not found")
    target = TARGETS[args.profile_target]
    if target.kind != "meshgate":
        raise BenchError(f"--profile-target must be a meshgate variant, not {target.name}")
    up_port = free_port()
    upstream = start_nginx(procs, "upstream-profile", workdir, upstream_block(up_port), LOAD_CORE, up_port)
    sink = start_sink(procs, workdir, "otlp-sink-profile") if target.exports else None
    jwks, policy = start_jwks(procs, workdir, "jwks-profile") if target.policy else (None, None)
    headers = policy.headers if policy else ()
    try:
        mg, port, _ = start_meshgate(
            procs,
            "meshgate-profile",
            workdir,
            up_port,
            1,
            target.access_log,
            otlp_endpoint=f"http://127.0.0.1:{sink[1]}" if sink else None,
            sample_ratio=target.sample_ratio,
            max_queue=args.trace_max_queue,
            route_name=policy.route if policy else "all",
            policy=policy.yaml(target) if policy else "",
            stdout_devnull=target.decision_log,
        )
        try:
            url = f"http://127.0.0.1:{port}/"
            if policy:
                policy_sanity_check(target, url, headers)
            else:
                sanity_check(url)
            run_wrk(url, args.warmup, args.connections, workdir, headers=headers)
            passes = [
                ("flamegraph", out / "profile.svg", []),
                ("raw", out / "profile.raw.txt", ["--threads", "--full-filenames"]),
            ]
            for fmt, path, extra in passes:
                print(f"  [profile] {target.name}: py-spy {fmt} {args.profile_duration:g}s ...", flush=True)
                load_s = round(args.profile_duration) + 3  # background load slightly longer than the sampling window
                wrk_argv = ["wrk", "-t1", f"-c{args.connections}", f"-d{load_s}s"]
                wrk_argv += [arg for header in headers for arg in ("-H", header)] + [url]
                load = procs.start("wrk-profile-load", ["taskset", "-c", str(LOAD_CORE), *wrk_argv])
                spy_argv = ["py-spy", "record", "--pid", str(mg.pid), "--duration", str(round(args.profile_duration))]
                spy_argv += ["--rate", str(args.profile_rate), "--format", fmt, "-o", str(path), *extra]
                spy_argv += [] if args.profile_blocking else ["--nonblocking"]
                try:
                    time.sleep(1)
                    spy = subprocess.run(
                        ["taskset", "-c", str(LOAD_CORE), *spy_argv],
                        capture_output=True,
                        text=True,
                        timeout=args.profile_duration + 60,
                    )
                    if spy.returncode != 0:
                        raise BenchError(f"py-spy failed ({spy.returncode}): {spy.stderr.strip()[-2000:]}")
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        load.proc.wait(load_s + 10)
                finally:
                    procs.stop(load)
            summary = summarize_profile(out / "profile.raw.txt")
            summary["target"] = target.name
            if sink:
                summary["spans_received"] = sink_stats(sink[1])["spans"]
        finally:
            procs.stop(mg, grace=15)
    finally:
        procs.stop(upstream)
        if sink:
            procs.stop(sink[0])
        if jwks:
            procs.stop(jwks)
    (out / "profile_top.txt").write_text(format_profile(summary))
    return summary


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frame_key(frame: str) -> tuple[str, str, int]:
    """``"func (path/file.py:123)"`` -> (func, short path, line); paths relative to the repo or site-packages."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), "", 0
    path = m.group("file")
    with contextlib.suppress(ValueError):
        path = str(Path(path).relative_to(REPO))
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return m.group("func"), path, int(m.group("line") or 0)


_OURS = ("gateway/", "telemetry/", "policy/")


def summarize_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive time per function from py-spy's collapsed-stack ("raw") output.

    py-spy sees Python frames only: time in C code (socket writes, the json C encoder, uvloop) is self time of
    the Python function that called it. Idle samples are not recorded, so percentages are of busy time.
    """
    self_t: collections.Counter[tuple[str, str]] = collections.Counter()
    incl_t: collections.Counter[tuple[str, str]] = collections.Counter()
    ours_lines: collections.Counter[tuple[str, str]] = collections.Counter()
    by_area: collections.Counter[str] = collections.Counter()
    incl_area: collections.Counter[str] = collections.Counter()
    by_thread: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        parts = stack.split(";")
        # with py-spy --threads the root frame is "thread (TID): NAME"
        thread = next((p.split(": ", 1)[-1] for p in parts if p.startswith("thread (")), "?")
        frames = [_frame_key(f) for f in parts if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        by_thread[thread] += count
        func, path, _ = frames[-1]
        self_t[func, path] += count
        by_area[_area(path)] += count
        for area in {_area(path_i) for _, path_i, _ in frames}:
            incl_area[area] += count
        for func_i, path_i, _ in set(frames):
            incl_t[func_i, path_i] += count
        # the innermost meshgate frame: where our code spends (or calls into library code for) the time
        for func_i, path_i, line_i in reversed(frames):
            if path_i.startswith(_OURS):
                ours_lines[func_i, f"{path_i}:{line_i}"] += count
                break

    def rows(counter: collections.Counter[tuple[str, str]], n: int, only_ours: bool = False) -> list[dict[str, Any]]:
        out = []
        for (func, path), count in counter.most_common():
            if only_ours and not path.startswith(_OURS):
                continue
            out.append({"function": func, "file": path, "samples": count, "pct": round(100 * count / total, 2)})
            if len(out) >= n:
                break
        return out

    return {
        "total_samples": total,
        "top_self": rows(self_t, top),
        "top_inclusive_meshgate": rows(incl_t, top, only_ours=True),
        "top_self_meshgate": rows(self_t, top, only_ours=True),
        "innermost_meshgate_line": rows(ours_lines, top),
        "self_by_area": [
            {"area": a, "samples": c, "pct": round(100 * c / total, 2) if total else 0.0}
            for a, c in by_area.most_common()
        ],
        # share of samples with at least one frame of the area on the stack (what the area costs, callees included)
        "inclusive_by_area": [
            {"area": a, "samples": c, "pct": round(100 * c / total, 2) if total else 0.0}
            for a, c in incl_area.most_common()
        ],
        "by_thread": [
            {"thread": t, "samples": c, "pct": round(100 * c / total, 2) if total else 0.0}
            for t, c in by_thread.most_common()
        ],
    }


def _area(path: str) -> str:
    if path.startswith(_OURS):
        return path.split("/", 1)[0] + "/"
    parts = path.split("/")
    if parts[0] == "opentelemetry" and len(parts) > 2:
        # the SDK (span objects, batch processor) apart from the exporter's encoding and its HTTP client
        depth = 5 if parts[1] == "exporter" and len(parts) > 5 else 2
        return "/".join(parts[:depth])
    if parts[0] == "google" and len(parts) > 1:
        return "google/" + parts[1]
    if len(parts) > 1:
        return parts[0]
    return path or "?"


def format_profile(summary: dict[str, Any]) -> str:
    """Human-readable profile summary."""
    sections = [
        ("Top functions by self time", "top_self"),
        ("meshgate code (gateway/, telemetry/, policy/) by inclusive time", "top_inclusive_meshgate"),
        ("meshgate code by self time", "top_self_meshgate"),
        ("Innermost meshgate line on the stack (own work or the library call it makes)", "innermost_meshgate_line"),
    ]
    lines = [f"py-spy samples (non-idle): {summary.get('total_samples', 0)}"]
    if summary.get("target"):
        lines[0] += f"; target {summary['target']}"
    if summary.get("spans_received") is not None:
        lines[0] += f"; spans received by the sink {summary['spans_received']:,}"
    lines += ["", "Samples by thread:"]
    for row in summary.get("by_thread", []):
        lines.append(f"     {row['pct']:6.2f}%  {row['thread']}")
    for title, key in sections:
        lines += ["", f"{title}:"]
        for i, row in enumerate(summary.get(key, []), 1):
            lines.append(f"{i:3d}. {row['pct']:6.2f}%  {row['function']}  ({row['file']})")
    lines += ["", "Self time by package/area:"]
    for row in summary.get("self_by_area", []):
        lines.append(f"     {row['pct']:6.2f}%  {row['area']}")
    lines += ["", "Inclusive time by package/area (samples with a frame of it on the stack):"]
    for row in summary.get("inclusive_by_area", []):
        lines.append(f"     {row['pct']:6.2f}%  {row['area']}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# reporting


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _median(values: Sequence[float | None]) -> float | None:
    present = sorted(v for v in values if v is not None)
    if not present:
        return None
    mid = len(present) // 2
    return present[mid] if len(present) % 2 else (present[mid - 1] + present[mid]) / 2


_AGGREGATED = (
    "rps",
    "proxy_us_per_req",
    "proxy_user_us_per_req",
    "proxy_sys_us_per_req",
    "proxy_main_us_per_req",
    "proxy_other_threads_us_per_req",
    "sink_us_per_req",
)


def aggregate(results: list[TargetResult]) -> dict[str, dict[str, Any]]:
    """Per target (in first-measured order): the median over its rounds of req/s, latency and CPU per request; spans
    received and expected summed over the rounds."""
    rounds: dict[str, list[TargetResult]] = {}
    for r in results:
        if r.ok:
            rounds.setdefault(r.target, []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for target, rs in rounds.items():
        row: dict[str, Any] = {"rounds": len(rs)}
        for name in _AGGREGATED:
            row[name] = _median([getattr(r, name) for r in rs])
        for p in ("p50", "p99"):
            row[p] = _median([r.latency_ms.get(p) for r in rs])
        traced = [r for r in rs if r.spans_received is not None]
        row["spans_received"] = sum(r.spans_received or 0 for r in traced) if traced else None
        row["spans_expected"] = sum(r.spans_expected or 0.0 for r in traced) if traced else None
        row["other_load_max"] = max((r.other_load_cores or 0.0) for r in rs)
        decided = [r for r in rs if r.authz_by_cache]
        by_cache: collections.Counter[str] = collections.Counter()
        for r in decided:
            by_cache.update(r.authz_by_cache)
        row["authz_by_cache"] = dict(by_cache) if decided else None
        row["authz_decided"] = sum(by_cache.values()) if decided else None
        row["authz_requests"] = sum(r.requests or 0 for r in decided) if decided else None
        row["cache_hit_share"] = by_cache.get("hit", 0) / sum(by_cache.values()) if decided else None
        failures = [r.authn_failures for r in rs if r.authn_failures is not None]
        row["authn_failures"] = sum(failures) if failures else None
        out[target] = row
    return out


def paired_ratio(results: list[TargetResult], target: str, field: str) -> float | None:
    """The median over rounds of ``target``'s ``field`` divided by the telemetry-off baseline's in the same round.

    Rounds are interleaved, so a pair shares the machine's state at that moment; on a VM whose speed drifts between
    rounds (seen here: the baseline moved 150 -> 230 µs/request within one run), paired ratios are steadier than a
    ratio of medians.
    """
    base = {r.round: getattr(r, field) for r in results if r.ok and r.target == TELEMETRY_BASE}
    pairs = [
        getattr(r, field) / base[r.round]
        for r in results
        if r.ok and r.target == target and base.get(r.round) and getattr(r, field) is not None
    ]
    return _median(pairs)


def paired_delta(results: list[TargetResult], target: str, field: str) -> float | None:
    """The median over rounds of ``target``'s ``field`` minus the baseline's in the same round (see
    :func:`paired_ratio`)."""
    base = {r.round: getattr(r, field) for r in results if r.ok and r.target == TELEMETRY_BASE}
    pairs = [
        getattr(r, field) - base[r.round]
        for r in results
        if r.ok and r.target == target and base.get(r.round) is not None and getattr(r, field) is not None
    ]
    median = _median(pairs)
    return round(median, 2) if median is not None else None


def ratios(results: list[TargetResult]) -> dict[str, dict[str, float | None]]:
    """Each target relative to direct, to nginx-proxy and to meshgate with telemetry off (req/s, p99, CPU/request).

    With several rounds, the per-target medians are compared.
    """
    agg = aggregate(results)
    direct, nginx, base = agg.get("direct"), agg.get("nginx-proxy"), agg.get(TELEMETRY_BASE)
    out: dict[str, dict[str, float | None]] = {}
    for target, row in agg.items():
        cpu = row["proxy_us_per_req"]
        out[target] = {
            "rps_vs_direct": _ratio(row["rps"], direct["rps"]) if direct else None,
            "p99_vs_direct": _ratio(row["p99"], direct["p99"]) if direct else None,
            "rps_vs_nginx_proxy": _ratio(row["rps"], nginx["rps"]) if nginx else None,
            "p99_vs_nginx_proxy": _ratio(row["p99"], nginx["p99"]) if nginx else None,
            "cpu_per_req_vs_nginx_proxy": _ratio(cpu, nginx["proxy_us_per_req"]) if nginx else None,
            "rps_vs_meshgate": _ratio(row["rps"], base["rps"]) if base else None,
            "p99_vs_meshgate": _ratio(row["p99"], base["p99"]) if base else None,
            "cpu_per_req_vs_meshgate": _ratio(cpu, base["proxy_us_per_req"]) if base else None,
            "cpu_per_req_vs_meshgate_paired": paired_ratio(results, target, "proxy_us_per_req") if base else None,
            "rps_vs_meshgate_paired": paired_ratio(results, target, "rps") if base else None,
            "p99_vs_meshgate_paired": paired_ratio(results, target, "p99_ms") if base else None,
            "cpu_delta_us_vs_meshgate_paired": paired_delta(results, target, "proxy_us_per_req") if base else None,
            "cpu_delta_us_vs_meshgate": (
                round(cpu - base["proxy_us_per_req"], 2)
                if base and cpu is not None and base["proxy_us_per_req"]
                else None
            ),
        }
    return out


def render(results: list[TargetResult], rel: dict[str, dict[str, float | None]]) -> str:
    """Markdown tables: absolute numbers per measured run, ratios (medians over rounds), telemetry cost."""
    many = any(r.round > 1 for r in results)
    lines = [
        "| target | req/s | p50 ms | p99 ms | proxy µs CPU/req | (user / sys) | proxy CPU util | upstream µs/req "
        "| wrk µs/req | core0 busy | core1 busy | other load | upstream new conns | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        label = f"{r.target} #{r.round}" if many and r.target.startswith("meshgate") else r.target
        if not r.ok:
            lines.append(f"| {label} | FAILED: {(r.error or '').splitlines()[0][:80]} ||||||||||||| |")
            continue
        lines.append(
            f"| {label} | {_fmt(r.rps, ',.0f')} | {_fmt(r.latency_ms.get('p50'), '.3f')} "
            f"| {_fmt(r.latency_ms.get('p99'), '.3f')} | {_fmt(r.proxy_us_per_req, '.1f')} "
            f"| {_fmt(r.proxy_user_us_per_req, '.1f')} / {_fmt(r.proxy_sys_us_per_req, '.1f')} "
            f"| {_fmt(r.proxy_cpu_util, '.0%')} | {_fmt(r.upstream_us_per_req, '.1f')} "
            f"| {_fmt(r.wrk_us_per_req, '.1f')} | {_fmt(r.core_busy.get('core0'), '.0%')} "
            f"| {_fmt(r.core_busy.get('core1'), '.0%')} | {_fmt(r.other_load_cores, '.2f')} "
            f"| {r.upstream_new_connections} | {r.errors} |"
        )
    median = " (medians over rounds)" if many else ""
    lines += [
        "",
        f"| target{median} | req/s ÷ direct | p99 ÷ direct | req/s ÷ nginx-proxy | p99 ÷ nginx-proxy "
        "| CPU/req ÷ nginx-proxy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for target, row in rel.items():
        lines.append(
            f"| {target} | {_fmt(row['rps_vs_direct'], '.3f')} | {_fmt(row['p99_vs_direct'], '.2f')} "
            f"| {_fmt(row['rps_vs_nginx_proxy'], '.3f')} | {_fmt(row['p99_vs_nginx_proxy'], '.2f')} "
            f"| {_fmt(row['cpu_per_req_vs_nginx_proxy'], '.2f')} |"
        )
    agg = aggregate(results)
    variants = [t for t in agg if t.startswith("meshgate")]
    if TELEMETRY_BASE in agg and len(variants) > 1:
        # span columns when some variant traces, policy columns when some variant has authn/authz
        traced = any(agg[t]["spans_received"] is not None for t in variants)
        policy = any(TARGETS[t].policy for t in variants if t in TARGETS)
        head = (
            f"| target{median} | rounds | req/s | p50 ms | p99 ms | µs CPU/req | main / other threads µs "
            f"| Δ µs/req vs {TELEMETRY_BASE} | CPU/req ÷ {TELEMETRY_BASE} | req/s ÷ {TELEMETRY_BASE} "
            f"| p99 ÷ {TELEMETRY_BASE} | CPU/req ÷ {TELEMETRY_BASE}, paired | req/s ÷ {TELEMETRY_BASE}, paired |"
        )
        columns = 13
        if policy:
            head += (
                f" Δ µs/req vs {TELEMETRY_BASE}, paired | p99 ÷ {TELEMETRY_BASE}, paired "
                "| authz decisions / requests | cache hit / miss / none | cache hit share | authn failures |"
            )
            columns += 6
        if traced or not policy:
            head += " spans received / expected | exported | sink µs/req |"
            columns += 3
        lines += ["", head, "|---|" + "---:|" * (columns - 1)]
        for target in variants:
            row, r = agg[target], rel[target]
            line = (
                f"| {target} | {row['rounds']} | {_fmt(row['rps'], ',.0f')} | {_fmt(row['p50'], '.3f')} "
                f"| {_fmt(row['p99'], '.3f')} | {_fmt(row['proxy_us_per_req'], '.1f')} "
                f"| {_fmt(row['proxy_main_us_per_req'], '.1f')} / {_fmt(row['proxy_other_threads_us_per_req'], '.1f')} "
                f"| {_fmt(r['cpu_delta_us_vs_meshgate'], '+.1f')} | {_fmt(r['cpu_per_req_vs_meshgate'], '.3f')} "
                f"| {_fmt(r['rps_vs_meshgate'], '.3f')} | {_fmt(r['p99_vs_meshgate'], '.2f')} "
                f"| {_fmt(r['cpu_per_req_vs_meshgate_paired'], '.3f')} | {_fmt(r['rps_vs_meshgate_paired'], '.3f')} |"
            )
            if policy:
                by_cache = row["authz_by_cache"] or {}
                decided, requests = row["authz_decided"], row["authz_requests"]
                decisions = f"{decided:,} / {requests:,}" if decided is not None and requests is not None else "-"
                cache = " / ".join(f"{by_cache.get(k, 0):,}" for k in ("hit", "miss", "none")) if by_cache else "-"
                line += (
                    f" {_fmt(r['cpu_delta_us_vs_meshgate_paired'], '+.1f')} "
                    f"| {_fmt(r['p99_vs_meshgate_paired'], '.2f')} "
                    f"| {decisions} | {cache} | {_fmt(row['cache_hit_share'], '.1%')} "
                    f"| {row['authn_failures'] if row['authn_failures'] is not None else '-'} |"
                )
            if traced or not policy:
                received, expected = row["spans_received"], row["spans_expected"]
                spans = f"{received:,} / {expected:,.0f}" if received is not None and expected is not None else "-"
                share = _fmt(received / expected, ".1%") if received is not None and expected else "-"
                line += f" {spans} | {share} | {_fmt(row['sink_us_per_req'], '.1f')} |"
            lines.append(line)
    return "\n".join(lines) + "\n"


def _version(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unavailable: {error}"
    return (done.stdout + done.stderr).strip().splitlines()[0] if (done.stdout + done.stderr).strip() else "?"


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "nginx": _version(["nginx", "-v"]),
        "wrk": _version(["wrk", "-v"]),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu_model"] = line.split(":", 1)[1].strip()
                break
    head = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "gateway", "telemetry", "policy"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    env["git"] = {"head": head, "uncommitted_gateway_files": len(dirty)}
    for mod in ("aiohttp", "uvloop"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    return env


# --------------------------------------------------------------------------------------------------------------
# main


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per target (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per target (default 2)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out", help="output directory")
    parser.add_argument("--access-log", action="store_true", help="also measure meshgate with access_log: true")
    parser.add_argument(
        "--telemetry",
        action="store_true",
        help="measure the cost of telemetry: direct, nginx-proxy, meshgate (telemetry off), meshgate-trace100, "
        "meshgate-trace10, meshgate-all, with an OTLP sink receiving the spans",
    )
    parser.add_argument(
        "--policy",
        action="store_true",
        help="measure the cost of JWT authn and Rego authz: direct, nginx-proxy, meshgate (no policy), meshgate-jwt, "
        "meshgate-authz-cache, meshgate-authz-nocache, meshgate-authz-log, with a JWKS server and a bearer token",
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        choices=ALL_TARGETS,
        default=None,
        help=f"targets to measure, baselines first (default: {' '.join(DEFAULT_TARGETS)}; with --telemetry: "
        f"{' '.join(TELEMETRY_TARGETS)}; with --policy: {' '.join(POLICY_TARGETS)})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure the meshgate variants this many times, interleaved; ratios use the medians (default 1)",
    )
    parser.add_argument(
        "--trace-max-queue",
        type=int,
        default=None,
        help="telemetry.tracing.batch.max_queue for the tracing variants (default: the gateway's, 2048 spans)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="before each target wait up to this many seconds for the machine to be idle (default 30, 0: off)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=1,
        help=f"re-measure a target up to N times while other load exceeded {NOISY_CORES} cores (default 1)",
    )
    parser.add_argument("--profile", action="store_true", help="afterwards, profile meshgate under load with py-spy")
    parser.add_argument("--profile-only", action="store_true", help="only the py-spy profile, no measurements")
    parser.add_argument("--profile-duration", type=float, default=10.0, help="py-spy seconds per format (default 10)")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s (default 200)")
    parser.add_argument(
        "--profile-blocking",
        action="store_true",
        help="let py-spy pause the process per sample (default --nonblocking: pausing skews samples to syscall exits)",
    )
    parser.add_argument(
        "--profile-access-log",
        action="store_true",
        help="profile with access_log: true (= --profile-target meshgate-accesslog)",
    )
    parser.add_argument(
        "--profile-target",
        choices=[t for t in ALL_TARGETS if TARGETS[t].kind == "meshgate" and TARGETS[t].workers == 1],
        default=None,
        help="meshgate variant to profile (default: meshgate; meshgate-trace100 with --telemetry, "
        "meshgate-authz-nocache with --policy)",
    )
    args = parser.parse_args(argv)
    if args.telemetry and args.policy:
        parser.error("--telemetry and --policy are separate runs")
    if args.profile_target is None:
        if args.profile_access_log:
            args.profile_target = "meshgate-accesslog"
        elif args.telemetry:
            args.profile_target = "meshgate-trace100"
        else:
            args.profile_target = "meshgate-authz-nocache" if args.policy else "meshgate"
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds must be 1..10")
    if args.trace_max_queue is not None and not 1 <= args.trace_max_queue <= 1_000_000:
        parser.error("--trace-max-queue must be 1..1000000")
    if not 1 <= args.duration <= 300 or not 0 <= args.warmup <= 60 or not 1 <= args.connections <= 10000:
        parser.error("--duration must be 1..300 s, --warmup 0..60 s, --connections 1..10000")
    if not 0 <= args.retries <= 5 or not 0 <= args.quiet_wait <= 600:
        parser.error("--retries must be 0..5, --quiet-wait 0..600 s")
    if not 1 <= args.profile_duration <= 120:
        parser.error("--profile-duration must be 1..120 s")
    return args


def _preflight() -> None:
    missing = [tool for tool in ("nginx", "wrk", "taskset") if not shutil.which(tool)]
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)}")
    if len(os.sched_getaffinity(0)) < 2 or not {PROXY_CORE, LOAD_CORE} <= os.sched_getaffinity(0):
        raise SystemExit(f"need cores {PROXY_CORE} and {LOAD_CORE} available for pinning")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit 0 if every selected target was measured without errors."""
    args = _parse_args(argv)
    _preflight()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (nohup, &)
    procs = Processes()
    workdir = out / "logs"  # configs, nginx prefixes and process logs of this run (replaced each run)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    started = time.monotonic()
    record: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "environment": environment(),
        "method": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "wrk_threads": 1,
            "proxy_core": PROXY_CORE,
            "load_core": LOAD_CORE,
            "pinning": f"process under test on core {PROXY_CORE}; wrk and (for proxied targets) the upstream nginx "
            f"(1 worker) on core {LOAD_CORE}; for 'direct' the upstream nginx is on core {PROXY_CORE}",
            "body_bytes": len(BODY),
            "rounds": args.rounds,
            "otlp_sink": f"bench/otlp_sink.py on core {LOAD_CORE} (OTLP/HTTP protobuf, spans decoded and counted)",
            "trace_max_queue": args.trace_max_queue,
            "policy": (
                "wrk sends 'Authorization: Bearer <RS256 token>' to every target; JWKS from python -m http.server on "
                f"core {LOAD_CORE}; bundle policy/rego; route orders-read, token roles [orders.read]"
                if args.policy
                else None
            ),
        },
    }
    results: list[TargetResult] = []
    exit_code = 0
    try:
        if not args.profile_only:
            results = run_targets(args, procs, workdir)
            rel = ratios(results)
            record["results"] = [asdict(r) for r in results]
            record["aggregate"] = aggregate(results)
            record["ratios"] = rel
            table = render(results, rel)
            print()
            print(table)
            (out / "summary.md").write_text(table)
            if any(not r.ok or r.errors for r in results):
                exit_code = 1
        if args.profile or args.profile_only:
            print(f"== profile: {args.profile_target} (1 worker) under wrk load, py-spy", flush=True)
            try:
                record["profile"] = profile_meshgate(args, procs, workdir, out)
                print(format_profile(record["profile"]))
            except BenchError as error:
                print(f"  [profile] FAILED: {error}", flush=True)
                record["profile"] = {"error": str(error)}
                exit_code = 1
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        exit_code = 130
    finally:
        procs.stop_all()
        record["elapsed_s"] = round(time.monotonic() - started, 1)
        if results or "profile" in record:
            (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"elapsed {record['elapsed_s']}s; results in {out / 'results.json'}", flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
