"""e2e: a real `meshgate run` process through its lifecycle.

Config reloads under load (file poll and SIGHUP), rejected edits, the SIGTERM drain, the admin endpoints,
``--workers`` and start-up failures. Everything runs against real gateway and upstream processes on loopback.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.config.compile import compile_text
from tests.procs import ROOT, Gateway, children, eventually, free_port, gateway, log_events

pytestmark = pytest.mark.e2e

RESTART_ONLY = "cannot change while running (restart meshgate to apply)"


# --- helpers ----------------------------------------------------------------------------------------------------


def make_config(*endpoints: int, **extra: Any) -> dict[str, Any]:
    """Routes ``api`` (``/api`` -> ``/v1``) and ``slow`` (``/delay``) to cluster ``main`` over the given ports."""
    config: dict[str, Any] = {
        "service": "test",
        "routes": [
            {"name": "api", "match": {"path_prefix": "/api"}, "cluster": "main", "rewrite": {"prefix": "/v1"}},
            {"name": "slow", "match": {"path_prefix": "/delay"}, "cluster": "main"},
        ],
        "clusters": [{"name": "main", "endpoints": [f"127.0.0.1:{port}" for port in endpoints]}],
    }
    config.update(extra)
    return config


def config_hash(config: dict[str, Any]) -> str:
    """The hash /config must report for ``config``, computed by the same compiler the gateway runs."""
    return compile_text(yaml.safe_dump(config, sort_keys=False)).hash


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        assert response.status == 200, (url, response.status, await response.text())
        return await response.json()


async def metric(session: aiohttp.ClientSession, gw: Gateway, sample: str) -> float:
    """The value of one Prometheus sample (``name{labels}`` exactly as exposed), 0 when not exposed yet."""
    async with session.get(f"{gw.admin_url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


APPLIED = 'meshgate_config_reloads_total{result="applied"}'
REJECTED = 'meshgate_config_reloads_total{result="rejected"}'


async def wait_version(session: aiohttp.ClientSession, gw: Gateway, version: int, within: float = 5.0) -> Any:
    async def check() -> Any:
        body = await get_json(session, f"{gw.admin_url}/config")
        return body if body["version"] == version else None

    return await eventually(check, within, f"/config version {version}")


async def in_flight(session: aiohttp.ClientSession, gw: Gateway) -> int:
    status = await get_json(session, f"{gw.admin_url}/status/upstreams")
    return sum(endpoint["in_flight"] for cluster in status.values() for endpoint in cluster["endpoints"])


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


# --- config reload ----------------------------------------------------------------------------------------------


async def test_reload_under_load_drops_nothing(tmp_path: Path, upstream_a: int, upstream_b: int) -> None:
    with gateway(tmp_path, make_config(upstream_a)) as gw:
        async with aiohttp.ClientSession() as session:
            applied_before = await metric(session, gw, APPLIED)
            first = await get_json(session, f"{gw.admin_url}/config")
            outcomes: Counter[str] = Counter()
            paths: set[str] = set()
            instances: set[str] = set()
            loading = True

            async def client() -> None:
                while loading:
                    try:
                        async with session.get(f"{gw.url}/api/x") as response:
                            body = await response.read()
                            outcomes[str(response.status)] += 1
                            if response.status == 200:
                                echo = json.loads(body)
                                paths.add(echo["path"])
                                instances.add(echo["instance"])
                    except aiohttp.ClientError as exc:
                        outcomes[type(exc).__name__] += 1

            clients = [asyncio.create_task(client()) for _ in range(6)]
            extra_route = {"name": "extra", "match": {"path_prefix": "/extra"}, "cluster": "main"}
            edits: list[Callable[[dict[str, Any]], None]] = [
                lambda c: c["routes"][0]["rewrite"].update(prefix="/v2"),  # a route's rewrite
                lambda c: c["clusters"][0]["endpoints"].append(f"127.0.0.1:{upstream_b}"),  # the endpoint set
                lambda c: c["routes"].insert(0, extra_route),  # a new route
                lambda c: c["clusters"][0].update(lb="least_request"),  # the balancer
            ]
            config = copy.deepcopy(gw.config)
            try:
                await asyncio.sleep(0.3)
                for number, edit in enumerate(edits, start=1):
                    edit(config)
                    gw.write_config(copy.deepcopy(config))
                    # Picked up by the 1 s file poll; waiting for each version makes every edit its own reload.
                    await wait_version(session, gw, first["version"] + number, within=4.0)
                    await asyncio.sleep(0.3)  # some load on each version
            finally:
                loading = False
                await asyncio.gather(*clients)

            assert set(outcomes) == {"200"}, f"failed requests during reloads: {dict(outcomes)}"
            assert outcomes["200"] > 200
            assert paths == {"/v1/x", "/v2/x"}  # both rewrites served, nothing else
            assert instances == {"a", "b"}  # the added endpoint took traffic

            async with session.get(f"{gw.url}/extra/y") as response:  # the added route
                assert response.status == 200
                assert (await response.json())["path"] == "/extra/y"
            served = await get_json(session, f"{gw.admin_url}/config")
            assert served["version"] == first["version"] + len(edits)
            assert served["hash"] == config_hash(config) != first["hash"]
            assert [route["name"] for route in served["config"]["routes"]] == ["extra", "api", "slow"]
            assert served["config"]["clusters"][0]["lb"] == "least_request"
            assert await metric(session, gw, APPLIED) == applied_before + len(edits)
            assert await metric(session, gw, "meshgate_config_version") == served["version"]


async def test_sighup_reloads_at_once(tmp_path: Path, upstream_a: int) -> None:
    with gateway(tmp_path, make_config(upstream_a)) as gw:
        async with aiohttp.ClientSession() as session:
            first = await get_json(session, f"{gw.admin_url}/config")
            config = copy.deepcopy(gw.config)
            config["routes"][0]["rewrite"]["prefix"] = "/v9"
            text = yaml.safe_dump(config, sort_keys=False)
            before = os.stat(gw.config_path)
            assert len(text.encode()) == before.st_size
            # Rewritten in place with the same size and the old mtime restored: the file poll (inode, size, mtime)
            # cannot see this edit, so only SIGHUP can apply it.
            gw.config_path.write_text(text)
            os.utime(gw.config_path, ns=(before.st_atime_ns, before.st_mtime_ns))
            await asyncio.sleep(1.3)  # over one poll interval: prove the poll really is blind to it
            assert (await get_json(session, f"{gw.admin_url}/config"))["version"] == first["version"]
            assert (await get_json(session, f"{gw.url}/api/x"))["path"] == "/v1/x"

            gw.process.send_signal(signal.SIGHUP)
            served = await wait_version(session, gw, first["version"] + 1, within=1.0)
            assert served["hash"] == config_hash(config)
            assert (await get_json(session, f"{gw.url}/api/x"))["path"] == "/v9/x"
            assert gw.process.poll() is None


async def test_rejected_edits_keep_the_last_good_config(tmp_path: Path, upstream_a: int) -> None:
    good = make_config(upstream_a)
    good["routes"].append({"name": "orders", "split": [{"cluster": "main", "weight": 1}]})
    with gateway(tmp_path, good) as gw:
        good = copy.deepcopy(gw.config)
        async with aiohttp.ClientSession() as session:
            first = await get_json(session, f"{gw.admin_url}/config")
            applied_before = await metric(session, gw, APPLIED)
            rejected_before = await metric(session, gw, REJECTED)

            async def rejected_lines(count: int) -> list[dict[str, Any]]:
                async def check() -> list[dict[str, Any]] | None:
                    lines = log_events(gw, "config_rejected")
                    return lines if len(lines) >= count else None

                return await eventually(check, 4.0, f"{count} config_rejected log line(s)")

            async def still_serving_first() -> None:
                for _ in range(5):
                    assert (await get_json(session, f"{gw.url}/api/x"))["path"] == "/v1/x"
                served = await get_json(session, f"{gw.admin_url}/config")
                assert (served["version"], served["hash"]) == (first["version"], first["hash"])

            # A semantic error: the route names a cluster that does not exist.
            broken = copy.deepcopy(good)
            broken["routes"][2]["split"][0]["cluster"] = "ordrs"
            gw.write_config(broken)
            [line] = await rejected_lines(1)
            assert line["level"] == "error"
            assert line["serving_version"] == first["version"]
            [problem] = line["errors"]
            assert problem["path"] == "routes[2].split[0].cluster"
            assert problem["message"].startswith('unknown cluster "ordrs"')
            await still_serving_first()
            assert await metric(session, gw, REJECTED) == rejected_before + 1

            # A valid config, but the listener cannot move while running.
            moved = copy.deepcopy(good)
            moved["listen"] = f"127.0.0.1:{free_port()}"
            gw.write_config(moved)
            line = (await rejected_lines(2))[1]
            assert line["errors"] == [{"path": "listen", "message": RESTART_ONLY}]
            await still_serving_first()
            # Exactly one more: each refused edit is counted once.
            assert await metric(session, gw, REJECTED) == rejected_before + 2

            # A later valid edit applies.
            fixed = copy.deepcopy(good)
            fixed["routes"][0]["rewrite"]["prefix"] = "/v3"
            gw.write_config(fixed)
            served = await wait_version(session, gw, first["version"] + 1, within=4.0)
            assert served["hash"] == config_hash(fixed)
            assert (await get_json(session, f"{gw.url}/api/x"))["path"] == "/v3/x"
            assert await metric(session, gw, APPLIED) == applied_before + 1
            assert await metric(session, gw, REJECTED) == rejected_before + 2
            assert len(log_events(gw, "config_rejected")) == 2


# --- SIGTERM drain ----------------------------------------------------------------------------------------------


async def refused(port: int) -> bool:
    """Whether a new TCP connection to the port is refused (not accepted and then closed)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def test_sigterm_drains_in_flight_requests(tmp_path: Path, upstream_a: int) -> None:
    with gateway(tmp_path, make_config(upstream_a, limits={"drain_timeout": "5s"})) as gw:
        async with aiohttp.ClientSession() as session, aiohttp.ClientSession() as admin:

            async def fetch_slow() -> tuple[int, Any]:
                async with session.get(f"{gw.url}/delay/1500") as response:
                    return response.status, await response.json()

            slow = asyncio.create_task(fetch_slow())
            await eventually(lambda: in_flight(admin, gw), 5.0, "the slow request in flight")
            started = time.monotonic()
            gw.process.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                async with admin.get(f"{gw.admin_url}/readyz") as response:
                    return response.status == 503 and (await response.json())["status"] == "draining"

            await eventually(not_ready, 1.0, "/readyz 503 while draining")
            await eventually(lambda: refused(gw.listen), 1.0, "new connections refused")
            assert not slow.done()  # all of the above happened while the request was still running

            status, body = await slow
            assert status == 200
            assert body["delayed_ms"] == 1500
            code = await asyncio.to_thread(gw.process.wait, 10)
            elapsed = time.monotonic() - started
            assert code == 0
            assert elapsed < 4.0  # it exits once the request is done, well within the 5 s drain timeout
            assert log_events(gw, "draining")
            assert log_events(gw, "stopped")


async def test_drain_timeout_cuts_requests_that_run_too_long(tmp_path: Path, upstream_a: int) -> None:
    with gateway(tmp_path, make_config(upstream_a, limits={"drain_timeout": "1s"})) as gw:
        async with aiohttp.ClientSession() as session, aiohttp.ClientSession() as admin:

            async def fetch_slow() -> int:
                async with session.get(f"{gw.url}/delay/5000") as response:
                    await response.read()
                    return response.status

            slow = asyncio.create_task(fetch_slow())
            await eventually(lambda: in_flight(admin, gw), 5.0, "the slow request in flight")
            started = time.monotonic()
            gw.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(gw.process.wait, 10)
            elapsed = time.monotonic() - started
            assert code == 0
            # aiohttp's shutdown waits drain_timeout for the handler, then cancels it and waits up to drain_timeout
            # again: the cut lands between 1 and 2 drain timeouts (see the report on server.py).
            assert 0.9 < elapsed < 3.0
            with pytest.raises(aiohttp.ClientError):
                await slow  # cut, not answered: the upstream would only have answered at 5 s
            assert time.monotonic() - started < 3.5


# --- admin port -------------------------------------------------------------------------------------------------

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)")


def samples(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` for every sample of ``name`` in a Prometheus/OpenMetrics text page."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(\{{[^}}]*\}})? (\S+)(?: # .*)?", line)
        if match:
            found[match[1] or ""] = float(match[2])
    return found


async def test_admin_endpoints(tmp_path: Path, upstream_a: int, upstream_b: int) -> None:
    with gateway(tmp_path, make_config(upstream_a, upstream_b)) as gw:
        async with aiohttp.ClientSession() as session, aiohttp.ClientSession() as admin:
            assert await get_json(admin, f"{gw.admin_url}/healthz") == {"status": "ok"}
            ready = {"status": "ready", "ready": True, "source": "file", "version": 1}
            assert await get_json(admin, f"{gw.admin_url}/readyz") == ready

            served = await get_json(admin, f"{gw.admin_url}/config")
            assert served["version"] == 1
            assert served["source"] == f"file:{gw.config_path}"
            assert served["hash"] == config_hash(gw.config)
            assert ISO_UTC.fullmatch(served["loaded_at"]), served["loaded_at"]
            loaded_at = datetime.fromisoformat(served["loaded_at"].replace("Z", "+00:00"))
            assert abs((datetime.now(UTC) - loaded_at).total_seconds()) < 120
            assert [route["name"] for route in served["config"]["routes"]] == ["api", "slow"]
            assert served["config"]["clusters"][0]["name"] == "main"

            async def fetch_slow() -> int:
                async with session.get(f"{gw.url}/delay/1000") as response:
                    await response.read()
                    return response.status

            slow = asyncio.create_task(fetch_slow())
            await eventually(lambda: in_flight(admin, gw), 5.0, "in_flight > 0 while a slow request runs")
            status = await get_json(admin, f"{gw.admin_url}/status/upstreams")
            assert set(status) == {"main"}
            endpoints = status["main"]["endpoints"]
            assert {e["address"] for e in endpoints} == {f"127.0.0.1:{upstream_a}", f"127.0.0.1:{upstream_b}"}
            for endpoint in endpoints:
                assert endpoint["healthy"] is True
                assert endpoint["ejected"] is False
                assert endpoint["breaker"] == "closed"
            assert sorted(e["in_flight"] for e in endpoints) == [0, 1]
            assert await metric(admin, gw, "http_server_active_requests") == 1
            assert await slow == 200
            assert await in_flight(admin, gw) == 0
            assert await metric(admin, gw, "http_server_active_requests") == 0

            for _ in range(3):
                await get_json(session, f"{gw.url}/api/items")
            async with session.get(f"{gw.url}/nowhere") as response:
                assert response.status == 404
                assert (await response.json())["error"] == "route_not_found"

            async with admin.get(f"{gw.admin_url}/metrics") as response:
                assert response.status == 200
                assert response.content_type == "text/plain"
                text = await response.text()
            counts = samples(text, "http_server_request_duration_seconds_count")
            by_route: Counter[str] = Counter()
            for labels, value in counts.items():
                by_route[re.search(r'http_route="([^"]*)"', labels)[1]] += int(value)  # type: ignore[index]
            assert by_route == {"api": 3, "slow": 1, "unmatched": 1}
            assert 'http_response_status_code="404"' in next(k for k in counts if 'http_route="unmatched"' in k)

            accept = "application/openmetrics-text; version=1.0.0,text/plain;q=0.5"
            async with admin.get(f"{gw.admin_url}/metrics", headers={"Accept": accept}) as response:
                assert response.status == 200
                assert response.content_type == "application/openmetrics-text"
                text = await response.text()
            assert text.endswith("# EOF\n")
            assert samples(text, "http_server_request_duration_seconds_count")


# --- --workers --------------------------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def listening_sockets(port: int) -> set[str]:
    """Inodes of the IPv4 sockets listening on ``port``."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            inodes.add(fields[9])
    return inodes


def sockets_of(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


async def test_two_workers_share_the_port(tmp_path: Path, upstream_a: int) -> None:
    with gateway(tmp_path, make_config(upstream_a), workers=2) as gw:

        async def both_started() -> bool:
            return len(log_events(gw, "gateway_started")) == 2

        await eventually(both_started, 15.0, "both workers started")
        supervisor = gw.process.pid
        processes = children(supervisor)  # the workers and multiprocessing's resource tracker
        workers = [pid for pid, cmd in processes.items() if "spawn_main" in cmd]
        assert len(workers) == 2, processes
        # SO_REUSEPORT: each worker has its own listening socket on the one port.
        listening = listening_sockets(gw.listen)
        held = [sockets_of(pid) & listening for pid in workers]
        assert all(len(h) == 1 for h in held), held
        assert held[0] != held[1]

        # A new connection per request, so the kernel spreads them over both listeners.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:

            async def fetch() -> int:
                async with session.get(f"{gw.url}/api/x") as response:
                    await response.read()
                    return response.status

            statuses = Counter(await asyncio.gather(*(fetch() for _ in range(200))))
        assert statuses == {200: 200}

        gw.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(gw.process.wait, 20) == 0
        assert len(log_events(gw, "stopped")) == 2  # both drained, neither was killed

        for pid in workers:
            assert not alive(pid)  # reaped by the supervisor before it exited

        async def all_gone() -> bool:  # the resource tracker ends when the last of the group is gone
            return not any(alive(pid) for pid in processes)

        await eventually(all_gone, 3.0, "no process of the group left")


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGHUP])
async def test_workers_signalled_while_starting(tmp_path: Path, upstream_a: int, first: signal.Signals) -> None:
    # /readyz answers as soon as one worker is up; the other may still be importing, with no handlers installed.
    # A signal forwarded to it then must wait for them, not kill it (that took the whole group down with exit 1).
    with gateway(tmp_path, make_config(upstream_a), workers=2) as gw:
        gw.process.send_signal(first)
        if first == signal.SIGHUP:  # a reload request: both workers come up and keep serving

            async def both_started() -> bool:
                return len(log_events(gw, "gateway_started")) == 2

            await eventually(both_started, 15.0, "both workers started")
            assert gw.process.poll() is None
            gw.process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(gw.process.wait, 20) == 0


# --- start-up failures ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("busy", ["listen", "admin"])
def test_port_in_use_exits_1_with_a_json_line(tmp_path: Path, upstream_a: int, busy: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = make_config(upstream_a, listen=f"127.0.0.1:{free_port()}", admin=f"127.0.0.1:{free_port()}")
        config[busy] = f"127.0.0.1:{port}"
        path = tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        result = run_cli("run", "-c", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]  # every line is JSON
    [failure] = [r for r in records if r["event"] == "listen_failed"]
    assert failure["level"] == "error"
    assert failure[busy] == f"127.0.0.1:{port}"
    assert str(port) in failure["error"]
    assert "in use" in failure["error"]


def test_missing_config_exits_1_without_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    result = run_cli("run", "-c", str(missing))
    assert result.returncode == 1
    assert result.stderr == f"{missing}: cannot read config file: No such file or directory\n"
    assert result.stdout == ""
