"""The real ``meshgate configservice`` process: tokens, configs, long-polls, bundles, instances, restart, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from policy.bundle import build_tarball
from tests.procs import ROOT, free_port, metric_sum, stop, wait_http

pytestmark = pytest.mark.e2e

# Until `meshgate configservice` is wired into gateway/cli.py, the same code runs through a tiny argparse harness.
_HARNESS = (
    "import argparse, sys\n"
    "from gateway.configservice.cli import add_configservice_command, run_configservice_command\n"
    "parser = argparse.ArgumentParser(prog='meshgate')\n"
    "add_configservice_command(parser.add_subparsers(dest='command', required=True))\n"
    "sys.exit(run_configservice_command(parser.parse_args()))\n"
)


def command() -> list[str]:
    if "add_configservice_command" in (ROOT / "gateway" / "cli.py").read_text():
        return [sys.executable, "-m", "gateway", "configservice"]
    return [sys.executable, "-c", _HARNESS, "configservice"]


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]


@contextmanager
def configservice(tmp_path: Path, data: Path, name: str = "cs") -> Iterator[Running]:
    port = free_port()
    log_path = tmp_path / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [*command(), "--data", str(data), "--listen", f"127.0.0.1:{port}"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    running = Running(process, port, log_path)
    try:
        wait_http(f"{running.url}/healthz", process=process)
        yield running
    finally:
        if process.poll() is None:
            stop(process)


def config(route: str, **extra: Any) -> dict[str, Any]:
    return {
        "routes": [{"name": route, "match": {"path_prefix": "/"}, "cluster": "c"}],
        "clusters": [{"name": "c", "endpoints": ["127.0.0.1:9001"]}],
        **extra,
    }


def read_tokens(path: Path) -> tuple[int, dict[str, str]]:
    """(file mode, name -> token) of a tokens file."""
    tokens = {t["name"]: t["token"] for t in yaml.safe_load(path.read_text())["tokens"]}
    return stat.S_IMODE(path.stat().st_mode), tokens


def tarball(tmp_path: Path, source: Path, name: str) -> bytes:
    out = tmp_path / f"{name}.tar.gz"
    build_tarball(source, out)
    return out.read_bytes()


async def test_configservice_process(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with configservice(tmp_path, data) as cs:
        # First start: tokens generated, the file's path (never a token) logged.
        (generated,) = [line for line in cs.logs() if line["event"] == "tokens_generated"]
        assert Path(generated["tokens_file"]) == data / "tokens.yaml"
        mode, tokens = read_tokens(data / "tokens.yaml")
        assert mode == 0o600
        admin = {"Authorization": f"Bearer {tokens['admin']}"}
        gw = {"Authorization": f"Bearer {tokens['gateway']}"}

        async with aiohttp.ClientSession(cs.url) as http:
            # Auth.
            async with http.get("/v1/services/orders/config") as r:
                assert r.status == 401
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
            async with http.put("/v1/services/orders/config", json=config("r1"), headers=gw) as r:
                assert r.status == 403

            # Push, read, long-poll woken by a push, 304 at the end of a wait.
            async with http.put("/v1/services/orders/config", data=yaml.safe_dump(config("r1")), headers=admin) as r:
                assert (r.status, await r.json()) == (201, {"version": 1})
            poll_headers = {
                **gw,
                "If-None-Match": '"1"',
                "X-Meshgate-Gateway": "gw-a",
                "X-Meshgate-Applied-Version": "1",
            }
            async with http.get("/v1/services/orders/config?wait=300ms", headers=poll_headers) as r:
                assert r.status == 304
            poll = asyncio.ensure_future(http.get("/v1/services/orders/config?wait=20s", headers=poll_headers))
            await asyncio.sleep(0.3)
            pushed = time.monotonic()
            async with http.put("/v1/services/orders/config", json=config("r2"), headers=admin) as r:
                assert r.status == 201
            async with await poll as r:
                woke = time.monotonic() - pushed
                assert r.status == 200
                assert r.headers["ETag"].startswith('"2-')  # "N-<content hash>": a reused number never matches
                assert (await r.json())["config"] == config("r2")
            assert woke < 1.0

            # Invalid: 422 with every problem, nothing stored.
            bad = {**config("r3"), "listen": "0.0.0.0:1", "clusters": []}
            async with http.put("/v1/services/orders/config", json=bad, headers=admin) as r:
                assert r.status == 422
                assert {e["path"] for e in (await r.json())["errors"]} >= {"listen", "clusters"}

            # Rollback and history.
            async with http.post("/v1/services/orders/rollback", json={"version": 1}, headers=admin) as r:
                assert (r.status, await r.json()) == (201, {"version": 3, "rollback_of": 1})
            async with http.get("/v1/services/orders/versions", headers=gw) as r:
                versions = (await r.json())["versions"]
                assert [(v["version"], v["rollback_of"]) for v in versions] == [(1, None), (2, None), (3, 1)]

            # Bundles: the shipped policy as a real .tar.gz; one calling an unknown built-in is refused.
            shipped = tarball(tmp_path, ROOT / "policy" / "rego", "shipped")
            async with http.put("/v1/bundles/authz", data=shipped, headers=admin) as r:
                assert r.status == 201
                etag = r.headers["ETag"]
            async with http.get("/v1/bundles/authz", headers=gw) as r:
                assert r.status == 200
                assert await r.read() == shipped
            async with http.get("/v1/bundles/authz", headers={**gw, "If-None-Match": etag}) as r:
                assert r.status == 304
            broken = tmp_path / "broken"
            broken.mkdir()
            (broken / "p.rego").write_text("package p\n\nimport rego.v1\n\nallow if no.such_builtin(input.x)\n")
            async with http.put("/v1/bundles/broken", data=tarball(tmp_path, broken, "broken"), headers=admin) as r:
                assert r.status == 422
                (error,) = (await r.json())["errors"]
                assert error["path"] == "p.rego"
                assert "built-in no.such_builtin is not available in the embedded engine" in error["message"]
            async with http.put(
                "/v1/services/orders/config", json=config("r4", authz={"bundle": "authz"}), headers=admin
            ) as r:
                assert (r.status, await r.json()) == (201, {"version": 4})
            async with http.put(
                "/v1/services/orders/config", json=config("r5", authz={"bundle": "nope"}), headers=admin
            ) as r:
                assert r.status == 422

            # Instances: an expiry alone wakes a long-poll on the list.
            body = {"address": "127.0.0.1:9001", "ttl": "1s"}
            async with http.put("/v1/services/orders/instances/i-1", json=body, headers=gw) as r:
                assert r.status == 200
            async with http.get("/v1/services/orders/instances", headers=gw) as r:
                listing = await r.json()
                assert [i["address"] for i in listing["instances"]] == ["127.0.0.1:9001"]
                tag = r.headers["ETag"]
            started = time.monotonic()
            async with http.get("/v1/services/orders/instances?wait=10s", headers={**gw, "If-None-Match": tag}) as r:
                assert r.status == 200
                assert (await r.json())["instances"] == []
            assert time.monotonic() - started < 2.5

            # Gateway status.
            async with http.get("/v1/gateways", headers=gw) as r:
                (row,) = (await r.json())["gateways"]
                assert (row["service"], row["id"], row["applied_version"]) == ("orders", "gw-a", 1)

            async with http.get("/metrics") as r:
                exposition = await r.text()
            assert (
                metric_sum(exposition, "meshgate_configservice_pushes_total", service="orders", result="created") == 4
            )
            assert metric_sum(exposition, "meshgate_configservice_latest_version", service="orders") == 4
            assert "meshgate_configservice_watchers" in exposition

            # SIGTERM with a poll parked: it is answered (304) at once and the process exits 0.
            poll = asyncio.ensure_future(
                http.get("/v1/services/orders/config?wait=60s", headers={**gw, "If-None-Match": '"4"'})
            )
            await asyncio.sleep(0.3)
            started = time.monotonic()
            cs.process.terminate()
            async with await poll as r:
                assert r.status == 304
            assert await asyncio.to_thread(cs.process.wait, 10) == 0
            assert time.monotonic() - started < 5

        lines = cs.logs()
        assert all(line["service"] == "configservice" and "event" in line for line in lines)
        assert {"configservice_started", "config_stored", "config_rejected", "bundle_stored", "stopped"} <= {
            line["event"] for line in lines
        }
        text = cs.log_path.read_text()
        assert tokens["admin"] not in text
        assert tokens["gateway"] not in text
        assert "Traceback" not in text

    # Restart: the data (versions, bundles, tokens) is all still there, and no tokens are generated again.
    with configservice(tmp_path, data, "cs2") as cs:
        async with aiohttp.ClientSession(cs.url) as http:
            async with http.get("/v1/services/orders/config", headers=gw) as r:
                body = await r.json()
                assert (body["version"], body["config"]) == (4, config("r4", authz={"bundle": "authz"}))
            async with http.get("/v1/bundles/authz", headers=gw) as r:
                assert await r.read() == shipped
        assert not [line for line in cs.logs() if line["event"] == "tokens_generated"]

        # A second process on the same data directory is refused (exit 1, one line, no traceback).
        second = await asyncio.to_thread(
            subprocess.run,
            [*command(), "--data", str(data), "--listen", f"127.0.0.1:{free_port()}"],
            capture_output=True,
            cwd=ROOT,
            timeout=30,
        )
        assert second.returncode == 1
        assert b"in use by another configservice process" in second.stderr
        assert b"Traceback" not in second.stderr + second.stdout


def test_usage_errors(tmp_path: Path) -> None:
    result = subprocess.run([*command(), "--listen", "nowhere"], capture_output=True, cwd=ROOT, timeout=30)
    assert result.returncode == 2
    (tmp_path / "tokens.yaml").write_text("tokens: [{name: a, token: short, role: admin}]\n")
    result = subprocess.run(
        [*command(), "--data", str(tmp_path / "d"), "--tokens", str(tmp_path / "tokens.yaml")],
        capture_output=True,
        cwd=ROOT,
        timeout=30,
    )
    assert result.returncode == 1
    assert b"tokens[0].token: required: at least 16 characters" in result.stderr
    assert b"Traceback" not in result.stderr
